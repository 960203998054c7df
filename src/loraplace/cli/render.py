"""How ``inspect`` and ``plan`` draw a model and its placements as text.

Usage::

    print(anatomy_text(anat))               # blocks x roles, shapes, totals, what is never adapted
    print(placement_map(placement, anat))   # roles x blocks grid, one symbol per rank
"""

from __future__ import annotations

from loraplace.core.text import fmt_int, text_table


def _table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    """A table whose columns are left-aligned except those in ``right``."""
    return text_table(header, rows, set(right))


def _shape(layer) -> str:
    """in x out; a fused expert parameter: experts x in x out (each expert's in x out)."""
    return (f"{layer.experts}x" if layer.is_parameter else "") + f"{layer.in_features}x{layer.out_features}"


def anatomy_text(anat) -> str:
    roles = list(anat.roles_present())
    # Blocks with identical (role -> shape) are grouped into ranges, as most models repeat one block.
    groups: list[tuple[list[int], tuple]] = []
    for b in range(anat.n_blocks):
        sig = tuple(
            (r, tuple(_shape(l) for l in anat.layers if l.block == b and l.role == r)) for r in roles
        )
        if groups and groups[-1][1] == sig:
            groups[-1][0].append(b)
        else:
            groups.append(([b], sig))
    rows = []
    for blocks, sig in groups:
        label = str(blocks[0]) if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
        rows.append([label] + [",".join(shapes) or "-" for _, shapes in sig])
    out = [
        f"{anat.model_type}: {anat.n_blocks} blocks at {anat.blocks_path}, {fmt_int(anat.base_params)} base parameters",
        "",
        "Shapes (in x out) by block and role:",
        _table(rows, ["blocks", *roles]),
    ]
    if any(l.is_parameter for l in anat.layers):
        out.append("(mlp.experts.*: routed experts, one fused parameter of experts x in x out per role, adapted "
                   "through PEFT's target_parameters with rank r on every expert)")
    out += ["", "Totals by role:"]
    by_role, params = anat.by_role(), anat.role_params()
    total_rows = [
        [r, str(len(by_role[r])), fmt_int(params[r]), f"{100 * params[r] / anat.base_params:.1f}%"] for r in roles
    ]
    other = [l for l in anat.layers if l.role == "other"]
    if other:
        total_rows.append(["other", str(len(other)), fmt_int(sum(l.params for l in other)), ""])
    out.append(_table(total_rows, ["role", "modules", "params", "of base"], right={1, 2, 3}))
    if anat.fixed:
        out += ["", "Inside the blocks but not adaptable (no placement role; placements leave these out):"]
        out.append(_fixed_table(anat))
    if anat.outside:
        out += ["", "Outside the blocks (never adapted by default):"]
        out.append(_table([[l.name, l.role, l.kind, f"{l.in_features}x{l.out_features}", fmt_int(l.params),
                            f"tied to {l.tied_to} (counted once)" if l.tied_to else ""] for l in anat.outside],
                          ["module", "role", "kind", "shape", "params", ""], right={4}))
    return "\n".join(out)


def _fixed_table(anat) -> str:
    rows = []
    for role, params in anat.fixed_params().items():
        fs = [f for f in anat.fixed if f.role == role]
        shapes = " + ".join("x".join(map(str, sh)) for sh in fs[0].shapes)
        rows.append([role, fs[0].kind, str(len(fs)), shapes, fmt_int(params),
                     f"{100 * params / anat.base_params:.1f}%", fs[0].reason])
    return _table(rows, ["role", "module", "modules", "shapes", "params", "of base", "why not adapted"], right={2, 4, 5})


_RANK_SYMBOLS = "#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def placement_map(placement, anat) -> str:
    """Roles x blocks grid: a symbol per distinct rank where adapted (legend below), '.' where not."""
    roles = list(anat.roles_present())
    where = {(anat.layer(n).role, anat.layer(n).block): r for n, r in placement.modules.items()}
    ranks = sorted(set(placement.modules.values()))
    symbol = {r: ("#" if len(ranks) == 1 else _RANK_SYMBOLS[1 + i % 52]) for i, r in enumerate(ranks)}
    width = max(len(r) for r in roles)
    lines = [" " * width + "  blocks 0" + (f"..{anat.n_blocks - 1}" if anat.n_blocks > 1 else "")]
    for role in roles:
        cells = ["." if (role, b) not in where else symbol[where[(role, b)]] for b in range(anat.n_blocks)]
        lines.append(f"{role.ljust(width)}  {''.join(cells)}")
    legend = ", ".join(f"{symbol[r]} rank {r}" for r in ranks)
    return "\n".join(lines + [f"{' ' * width}  ({legend}; . not adapted)"])


def auto_why(placement, probe, criterion: str, top: int = 5) -> str:
    """Why auto chose what it chose: the score cut-off, the best chosen and the best left-out modules (a subset);
    the highest and lowest ranks with their scores (ranks over every module)."""
    mean = probe.mean(criterion)
    order = sorted(mean, key=lambda n: (-mean[n], n))
    name = placement.strategy.name
    if len(placement.modules) == len(order) and len(set(placement.modules.values())) > 1:  # allocate=rank
        ranks = placement.modules
        lines = [f"{name} spread ranks {min(ranks.values())}-{max(ranks.values())} over all {len(order)} modules in "
                 f"proportion to {criterion} (mean over probe seeds {', '.join(map(str, probe.seeds))})"]
        lines += [f"  rank {ranks[n]:4d}  {mean[n]:10.4g}  {n}" for n in order[:top]]
        lines += ["  ..."] + [f"  rank {ranks[n]:4d}  {mean[n]:10.4g}  {n}" for n in order[-top:]]
        return "\n".join(lines)
    chosen = [n for n in order if n in placement.modules]
    left = [n for n in order if n not in placement.modules]
    lines = [f"{name} chose {len(chosen)} of {len(order)} modules by {criterion} (mean over probe seeds "
             f"{', '.join(map(str, probe.seeds))}); lowest chosen score {mean[chosen[-1]]:.4g}"
             + (f", highest left out {mean[left[0]]:.4g}" if left else "")
             + (" (a higher-scored module is left out when it does not fit the rest of the budget)"
                if left and mean[left[0]] > mean[chosen[-1]] else "")]
    lines += [f"  chosen   {mean[n]:10.4g}  {n}" for n in chosen[:top]]
    lines += [f"  left out {mean[n]:10.4g}  {n}" for n in left[:top]]
    return "\n".join(lines)


def _rank_text(p) -> str:
    ranks = sorted(set(p.modules.values()))
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
