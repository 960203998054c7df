"""A methods paragraph written from the study's database: model, data, placements, training, evaluation, statistics.

Usage::

    md, tex = methods(a, store)      # a: analysis.findings.StudyAnalysis of the open ``store``

Every number is read from the store (the stored config, the ``anatomy``, ``data``, ``zero_shot`` and
``forgetting`` meta, the trials' placements and environment) or from the analysis built from it, so the
paragraph, the tables and the report cannot disagree. The Markdown and the LaTeX say the same.
"""

from __future__ import annotations

from loraplace.analysis.decision import cost_rule
from loraplace.analysis.latex import escape
from loraplace.analysis.findings import StudyAnalysis
from loraplace.core.names import is_auto, is_selected
from loraplace.core.text import lr_text
from loraplace.placement.resolve import BUDGET_TOLERANCE
from loraplace.placement.variants import VARIANTS
from loraplace.store.db import DONE, FINAL


def _ranks(s) -> str:
    if s.placement is None or not s.placement.modules:
        return "?"
    ranks = sorted({m.rank for m in s.placement.modules.values()})
    text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    variant = VARIANTS.get(s.placement.variant)  # a name this version does not know: said as plain ranks
    return f"{text}, {variant.methods_label}" if variant and variant.methods_label else text


def _chosen(a: StudyAnalysis, store) -> list[str]:
    """How the data-driven placements were chosen, and what choosing them cost."""
    names = {s.strategy for s in a.strategies}
    out = []
    kappa = store.get_meta("kappa")
    if "kappa" in names and kappa:
        out.append(f"`kappa` adapted the {a.config.kappa.top_p:g} share of modules whose base weights have the lowest "
                   f"condition number (PEFT's `find_kappa_target_modules`; the SVDs of {len(kappa['order'])} weight "
                   f"matrices took {kappa['time_s']:.1f} s, once per study).")
    eva = store.get_meta("eva")
    if "eva" in names and eva:
        ranks, base = list(eva["ranks"].values()), eva["base"]
        out.append(f"`eva` took its ranks and initial A matrices from PEFT's EVA: an incremental SVD of every module's "
                   f"inputs on the training examples (completion tokens), a rank sum of {sum(base.values())} over "
                   f"{len(base)} modules redistributed by explained variance (at most {a.config.eva.rho:g} times a "
                   f"module's even share; {len(ranks)} modules kept, ranks {min(ranks)}-{max(ranks)}, alpha scaled with "
                   f"the rank), B at zero; EVA took {eva['time_s']:.1f} s, once per study.")
    trained: dict[str, list] = {}  # variant -> its strategies, in the study's order
    for s in a.strategies:
        if s.placement is not None:
            trained.setdefault(s.placement.variant, []).append(s)
    out += [text for v, strategies in trained.items() if v in VARIANTS and (text := VARIANTS[v].methods(strategies, a.config))]
    autos = sorted(n for n in names if is_auto(n))
    if autos and a.probe is not None:
        how = "; ".join(f"`{n}` {'spread ranks over every module in proportion to' if a.config.auto.settings(n)[0] == 'rank' else 'took the modules with the highest'} "
                        f"{a.config.auto.settings(n)[1].replace('_', ' ')} score" for n in autos)
        out.append(f"A probe (rank {a.config.probe.rank}, {a.config.probe.steps} steps, seeds "
                   f"{', '.join(map(str, a.probe.seeds))}; {a.probe.time_s:.0f} s) scored every module: {how}.")
    return out


def _scales(a: StudyAnalysis) -> str:
    """The LoRA scale of the study's variants: 'scale alpha/r', or each variant's where they differ."""
    used = {VARIANTS[s.placement.variant] for s in a.strategies if s.placement is not None and s.placement.variant in VARIANTS}
    plain = VARIANTS["lora"].scale
    other = sorted((v.label, v.scale) for v in used if v.scale != plain)
    return f"scale {plain}" + "".join(f"; {scale} under {label}" for label, scale in other)


def _rate(a: StudyAnalysis, lr: float) -> str:
    """The peak learning rate inside the training sentence: the shared one, or a pointer to ``_search``."""
    if a.tuning is None:
        return f"peak learning rate {lr_text(lr)}, shared by every strategy and not tuned"
    return "its strategy's own peak learning rate, chosen as the next sentence says"


def _search(a: StudyAnalysis, trials) -> list[str]:
    """A tuned study's search in a sentence of its own: the grid, the selection split, the seeds, the rule, the rates;
    then what the final trials trained on (from their configs: ``tune.reuse``), and which were the tuning trials."""
    t = a.tuning
    if t is None:
        return []
    chosen = "; ".join(f"`{s}` {lr_text(c.lr)}" for s, c in t.choices.items() if c.lr is not None)
    finals = [r for r in trials if r.phase == FINAL]
    if any("train_data" in (r.config or {}) for r in finals):
        read = sum(bool(r.measured.get("trained_as")) for r in finals)
        data = ("The final trials trained on the same data as the tuning trials" + (
            f"; {read} of them were the tuning trials of the same seed and rate, evaluated on the evaluation set "
            "without training again" if read else "") + ".")
    else:
        data = "The final trials trained on the whole training data."
    return [f"Each strategy's peak learning rate was chosen from {', '.join(lr_text(x) for x in t.grid)} by the lowest "
            f"mean loss on a selection split of {t.selection} training examples (not the evaluation set) over tuning "
            f"seed{'s' if len(t.seeds) != 1 else ''} {', '.join(map(str, t.seeds))}, the tuning trials training on "
            f"the rest; {t.rule}. Chosen: {chosen}. {data}"]


def sentences(a: StudyAnalysis, store) -> list[str]:
    """The paragraph as plain sentences (Markdown inline code marks names)."""
    cfg = a.config
    anat, data = store.get_meta("anatomy") or {}, store.get_meta("data") or {}
    zero, forget = store.get_meta("zero_shot") or {}, store.get_meta("forgetting")
    done = [t for t in store.current_trials() if t.status == DONE]
    env = done[0].env if done else {}
    t, e = cfg.train, cfg.eval
    out = []
    size = f"{anat['base_params']:,} parameters, {anat['n_blocks']} transformer blocks" if anat else "its parameters"
    out.append(f"We fine-tuned `{cfg.model}` ({anat.get('model_type', '?')}, {size}) with LoRA adapters placed by "
               f"{len(a.strategies)} strategies and compared them under identical data, steps and hyperparameters.")
    if cfg.data.eval_source:
        split = (f"evaluated on the fixed file `{cfg.data.eval_source}` ({data.get('eval_examples', '?')} examples"
                 + (f", its first {cfg.data.eval_limit}" if cfg.data.eval_limit else "") + ")")
    else:
        split = (f"evaluated on {data.get('eval_examples', '?')} examples held out from it by a split seeded with "
                 f"{cfg.data.split_seed}")
    out.append(f"Training data: `{cfg.data.source}`, {data.get('train_examples', '?')} examples "
               f"(at most {cfg.data.max_length} tokens each), {split}; {data.get('eval_tokens', '?'):,} evaluation "
               "target tokens." if isinstance(data.get("eval_tokens"), int) else
               f"Training data: `{cfg.data.source}`, {split}.")
    placed = "; ".join(f"`{s.strategy}` ({s.mean('trainable_params'):,.0f} trainable parameters, "
                       f"{len(s.placement.modules) if s.placement else '?'} modules, {_ranks(s)})"
                       for s in a.strategies)
    chosen = [s.strategy for s in a.strategies if is_selected(s.strategy)]
    who = "Every strategy's" if not chosen else "The other strategies'"
    budget = (f" {who} ranks were scaled by one factor to match the budget `{cfg.budget}` within "
              f"{100 * BUDGET_TOLERANCE:.0f}%." if cfg.budget else "")
    out.append(f"Placements: {placed}.{budget}")
    out += _chosen(a, store)
    length = f"{t.epochs:g} epochs" if t.epochs is not None else f"{t.steps} optimizer steps"
    warm = f"{t.warmup:g} of the steps" if t.warmup < 1 else f"{t.warmup:g} steps"
    out.append(f"Each trial trained for {length} of {t.batch_size} examples with AdamW ({_rate(a, t.lr)}, "
               f"{t.schedule} decay after a linear warm-up over {warm}, weight decay {t.weight_decay:g}, gradient "
               f"clipping at {t.max_grad_norm:g}), LoRA alpha {t.alpha:g} ({_scales(a)}), LoRA dropout "
               f"{t.dropout:g}, in {t.dtype} on {env.get('gpu') or env.get('device', '?')}; the loss was the token-"
               "weighted next-token cross-entropy on completion tokens only.")
    out += _search(a, store.current_trials())
    out.append(f"Every strategy ran with {len(cfg.seeds)} seed{'s' if len(cfg.seeds) != 1 else ''} "
               f"({', '.join(map(str, cfg.seeds))}); a seed fixes the data order and the adapter initialisation.")
    ev = [f"the token-weighted evaluation loss (the base model's: {zero['eval_loss']:.4f} nats/token)"
          if "eval_loss" in zero else "the token-weighted evaluation loss"]
    if e.accuracy and "accuracy" in zero:
        ev.append(f"exact-match accuracy of greedy generations on {zero.get('accuracy_n', '?')} examples (the base "
                  f"model's: {100 * zero['accuracy']:.1f}%)")
    if forget:
        on = ("text sampled from the base model (an estimate of KL(base || adapted) per token)"
              if forget["source"] == "base" else f"`{forget['source']}`")
        ev.append(f"forgetting, the adapted model's loss minus the base model's on {forget['tokens']:,} tokens of {on}")
    out.append("We measured " + ", ".join(ev) + ".")
    out.append(f"Intervals are two-sided 95% Student-t intervals across seeds; differences from the baseline "
               f"`{a.baseline}` are paired by seed (paired t-test). Retained improvement is the share of the "
               f"baseline's improvement over the base model in {a.metric.replace('_', ' ')}, per seed; the recommended "
               f"strategy is the cheapest whose whole interval of it is at least {100 * a.threshold:.0f}%.")
    out.append(cost_rule())
    if cfg.race.at:
        out.append(f"Trials raced: at {', '.join(f'{100 * f:.0f}%' for f in cfg.race.at)} of the steps, strategies whose "
                   f"upper {100 * cfg.race.confidence:.0f}% bound of retained improvement was below the threshold less "
                   f"{cfg.race.slack:g} x the square of the remaining share of the steps were stopped.")
    sw = ", ".join(f"{k} {env[k]}" for k in ("loraplace", "torch", "transformers", "peft") if k in env)
    if sw:
        out.append(f"Software: {sw}; Python {env.get('python', '?')} on {env.get('platform', '?')} "
                   f"({env.get('torch_threads', '?')} torch threads).")
    return out


def methods(a: StudyAnalysis, store) -> tuple[str, str]:
    """(Markdown, LaTeX) of the methods paragraph."""
    text = sentences(a, store)
    md = "# Methods\n\n" + " ".join(text) + "\n"
    tex = " ".join(_tex(s) for s in text)
    return md, "% Written by loraplace report from the study's database.\n" + tex + "\n"


def _tex(sentence: str) -> str:
    """Markdown inline code as \\texttt, the rest escaped."""
    parts = sentence.split("`")
    return "".join(f"\\texttt{{{escape(p)}}}" if i % 2 else escape(p) for i, p in enumerate(parts))
