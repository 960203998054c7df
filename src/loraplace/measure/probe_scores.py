"""The probe's stored scores: per module, per probe seed, per criterion; their spread and rank agreement.

Usage::

    probe = load(store)                      # the latest probe of the study directory, or None
    probe.mean("lora_drop")                  # full module name -> mean score over probe seeds
    print(probe.table("lora_drop"))          # block x role, with the seed-to-seed spread
    probe.rank_correlation("lora_drop")      # Spearman rho of the module ordering between probe seeds

Torch-free (the report reads probe scores); running the probe is ``measure.probe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraplace.core.errors import LoraplaceError
from loraplace.core.methods import PROBE_CRITERIA
from loraplace.core.roles import role_rank
from loraplace.core.text import text_table
from loraplace.store.keys import key

CRITERIA = PROBE_CRITERIA  # lora_drop, grad_norm, fisher: defined in measure/probe.py's docstring


class ProbeError(LoraplaceError, RuntimeError):
    """The probe could not score the modules (non-finite scores, a changed base model)."""


@dataclass
class ProbeScores:
    """The stored scores of one probe: rows (seed, block, role, module, criterion, score) and per-seed info."""

    key: str
    rows: list[tuple]
    info: dict  # meta ``probe:<key>``: {"seeds": {"0": {"time_s", "steps", "rank", ...}}}

    @property
    def seeds(self) -> list[int]:
        return sorted({r[0] for r in self.rows})

    @property
    def criteria(self) -> list[str]:
        return [c for c in CRITERIA if any(r[4] == c for r in self.rows)]

    @property
    def time_s(self) -> float:
        """Wall time of every stored probe seed together (s)."""
        return sum(float(v.get("time_s", 0.0)) for v in self.info.get("seeds", {}).values())

    def only(self, seeds) -> "ProbeScores":
        """The scores of these probe seeds only."""
        keep = {int(s) for s in seeds}
        return ProbeScores(self.key, [r for r in self.rows if r[0] in keep],
                           {**self.info, "seeds": {k: v for k, v in self.info.get("seeds", {}).items() if int(k) in keep}})

    def layout(self) -> dict[str, tuple[int, str]]:
        """module -> (block, role)."""
        return {r[3]: (r[1], r[2]) for r in self.rows}

    def per_seed(self, criterion: str) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for seed, _, _, module, crit, score in self.rows:
            if crit == criterion:
                out.setdefault(seed, {})[module] = score
        if not out:
            raise ProbeError(f"probe {self.key} has no {criterion!r} scores; it has: {', '.join(self.criteria)}")
        return out

    def mean(self, criterion: str) -> dict[str, float]:
        """module -> mean score over the probe seeds."""
        seeds = self.per_seed(criterion)
        modules = set.intersection(*(set(v) for v in seeds.values()))
        return {m: sum(v[m] for v in seeds.values()) / len(seeds) for m in sorted(modules)}

    def spread(self, criterion: str) -> dict[str, float] | None:
        """module -> standard deviation across probe seeds (ddof=1); None with one seed."""
        seeds = self.per_seed(criterion)
        if len(seeds) < 2:
            return None
        mean = self.mean(criterion)
        return {m: math.sqrt(sum((v[m] - mu) ** 2 for v in seeds.values()) / (len(seeds) - 1)) for m, mu in mean.items()}

    def rank_correlation(self, criterion: str) -> list[tuple[int, int, float]]:
        """(seed a, seed b, Spearman rho of the modules' scores) for every pair of probe seeds."""
        seeds = self.per_seed(criterion)
        modules = sorted(set.intersection(*(set(v) for v in seeds.values())))
        keys = sorted(seeds)
        return [(a, b, spearman([seeds[a][m] for m in modules], [seeds[b][m] for m in modules]))
                for i, a in enumerate(keys) for b in keys[i + 1:]]

    def summary(self, criterion: str) -> str:
        """One line: seeds, mean rank correlation across seed pairs, median relative spread."""
        rho = [r for _, _, r in self.rank_correlation(criterion)]
        spread, mean = self.spread(criterion), self.mean(criterion)
        parts = [f"{criterion}: {len(self.per_seed(criterion))} probe seed(s)"]
        if rho:
            parts.append(f"Spearman rho across seeds {sum(rho) / len(rho):.3f} (min {min(rho):.3f}, {len(rho)} pair(s))")
        if spread:
            rel = sorted(spread[m] / mean[m] for m in mean if mean[m] > 0)
            if rel:
                parts.append(f"median seed-to-seed spread {100 * rel[len(rel) // 2]:.1f}% of the mean")
        return "; ".join(parts)

    def table(self, criterion: str) -> str:
        """Block x role table of the mean score (3 significant digits) and the seed-to-seed sd as % of it."""
        mean, spread, layout = self.mean(criterion), self.spread(criterion), self.layout()
        roles = sorted({r for _, r in layout.values()}, key=role_rank)
        cell = {layout[m]: f"{v:.3g}" + (f" ±{100 * spread[m] / v:.0f}%" if spread and v > 0 else "")
                for m, v in mean.items()}
        blocks = sorted({b for b, _ in layout.values()})
        rows = [[str(b)] + [cell.get((b, r), "-") for r in roles] for b in blocks]
        return text_table(["block", *roles], rows)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def probe_key(cfg) -> str:
    """Hash of what can change a probe's scores (``store.keys.KINDS["probe"]``): model, data, probe settings (not
    its seeds), and the trials' training identity less what the probe sets itself (``store.keys.PROBE_OWN``)."""
    return key("probe", cfg)


def load(store, key: str | None = None) -> ProbeScores | None:
    """The stored probe ``key`` (every stored seed), or by default the latest one run in this study directory
    (the seeds that run asked for); None when there is none."""
    seeds = None
    if key is None:
        latest = store.get_meta("probe")
        if not latest:
            return None
        key, seeds = latest["key"], latest.get("seeds")
    rows = store.probe_rows(key)
    if not rows:
        return None
    scores = ProbeScores(key, rows, store.get_meta(f"probe:{key}", {"seeds": {}}))
    return scores.only(seeds) if seeds else scores
