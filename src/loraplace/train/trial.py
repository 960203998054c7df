"""One trial's running state and its lifecycle: start, advance, evaluate, checkpoint, restore, finish.

Usage::

    setup = Setup(model, train_set, eval_set, train_spec, eval_spec, pad_id=0)
    trial = Trial.start(setup, placement, seed=0)      # adapters initialised by PEFT, AdamW, RNG, step 0
    sequential.advance(setup, [trial], 10)             # or fused.advance(setup, trials, 10): 10 optimizer steps
    trial.save(path)                                   # a resumable checkpoint: adapters, AdamW, RNG, step
    trial = Trial.restore(path, setup, placement)      # in this process or in a new one
    sequential.evaluate(setup, [trial])
    result = trial.finish(setup, adapter_dir)          # accuracy, saved adapter, the TrialResult

A Trial owns what makes one run differ from another: its placement and seed, its adapter tensors, AdamW
state, LoRA-dropout RNG state, the step it is at (which is also where it is in the data:
``data.batches.train_batches``) and what it has measured. The learning rate of every step follows the
whole run's schedule, however the run is cut into pieces, so a trial advanced in pieces (checkpointed and
restored between them, even in another process) computes exactly what it computes in one go. The
engines (``train.sequential``, ``train.fused``) only decide how a step's rows go through the frozen base.
Variants with state beyond A and B keep it here too: AdaLoRA's rank allocator (``train.adalora``, called
between AdamW's step and zero_grad) and PiSSA's initial A and B, from which each attachment builds the
trial's own residual base (``train.pissa``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loraplace.core.config import EvalSpec, TrainSpec
from loraplace.core.errors import LoraplaceError
from loraplace.core.files import atomic_dir
from loraplace.core.metrics import train_flops
from loraplace.data.batches import batches_per_epoch, collate, epoch_order
from loraplace.data.tokenize import TokenizedSet
from loraplace.placement.peft import apply, base_name, lora_layers
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import BUDGET_TOLERANCE, Placement
from loraplace.placement.strategy import PISSA
from loraplace.train import adalora, pissa
from loraplace.train.schedule import lr_factor, total_steps

CHECKPOINT_FILE = "trial.pt"  # inside a trial's checkpoint directory
CHECKPOINT_VERSION = 1


class TrialError(LoraplaceError, RuntimeError):
    """A trial failed in a way worth recording (e.g. a non-finite loss); the message is one line."""


@dataclass
class TrialResult:
    metrics: dict
    curve: list[tuple[int, float]]  # (step, token-weighted train loss of that step's batch)
    placement: PlacementRecord  # what was trained, as stored and exported
    adapter_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, figures) at the rungs before the end
    measured: dict = field(default_factory=dict)  # {"forgetting": key of the set it was measured on}


@dataclass(frozen=True)
class Setup:
    """What every trial of a study shares, as the engines read it (``study.workspace.Workspace`` builds one)."""

    model: torch.nn.Module  # the frozen base, never wrapped between trials
    train_set: TokenizedSet
    eval_set: TokenizedSet
    train: TrainSpec
    eval: EvalSpec
    pad_id: int
    device: str = "cpu"
    accuracy: Callable | None = None  # model -> {"accuracy", "accuracy_n"} on fixed examples; None: not measured
    forgetting: object | None = None  # measure.forgetting.ForgettingSet: measure(model) at the end; None: not measured
    prefix_cache_bytes: int | None = None  # cap on the frozen-prefix cache (None: a share of free memory; 0: none)
    inits: dict = field(default_factory=dict)  # placement.init -> {module: A (r, in)}: where A starts (EVA's)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a whole trial (``train.steps``, or ``train.epochs`` passes over the train set)."""
        return total_steps(self.train, len(self.train_set))


def generator(device) -> torch.Generator:
    """The default generator that LoRA dropout on ``device`` draws from."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class Trial:
    """A running trial. Build it with ``start`` (step 0) or ``restore`` (from a checkpoint)."""

    def __init__(self, placement: Placement, seed: int, total: int, params: dict[str, torch.nn.Parameter],
                 scales: dict[str, float], rng: torch.Tensor | None, spec: TrainSpec):
        self.placement, self.seed, self.total = placement, seed, total
        self.params = params  # base-model parameter name -> trainable tensor, in model order (AdamW's order)
        self.scales = scales  # adapted module -> LoRA scaling (alpha / r)
        self.rng = rng  # LoRA-dropout generator state; None without dropout
        self.opt = torch.optim.AdamW(list(params.values()), lr=spec.lr, weight_decay=spec.weight_decay)
        self.step = 0  # optimizer steps done: also the position in the data
        self.curve: list[tuple[int, float]] = []  # (step, token-weighted train loss of the step's batch)
        self.tail: list[tuple[float, int]] = []  # (summed NLL, target count) per step
        self.tokens = self.slots = 0  # real and padded token slots fed to the model
        self.train_time = self.eval_time = 0.0  # s; in a fused group, this trial's share of each step
        self.peak = 0  # bytes: the highest peak-memory reading of any piece
        self.eval: dict | None = None  # the latest evaluation (eval_loss, perplexity, eval_tokens) and its step
        self.evals: list[tuple[int, dict]] = []  # (step, figures) of the evaluations at rungs, before the end
        self.error: str | None = None  # why the trial failed (it advances no further)
        self.fused: dict = {}  # in a fused group: size, token slots and real tokens of its batches, wall time (s)
        self.prefix = None  # the sequential engine's frozen-prefix cache (train.prefix), kept in memory only
        self.prefix_checked = False
        self.prefix_blocks = 0  # frozen blocks served from a prefix cache at least once (0: none)
        self._order: tuple[int, list[list[int]]] | None = None  # (epoch, its batches): the data position's epoch
        self._attached = None  # the PEFT wrapping while attached
        self._adapters = None
        self.allocator = adalora.new_state() if placement.allocation else None  # variant adalora: PEFT's allocator state
        self.method_time = 0.0  # s the variant's own work took: AdaLoRA's allocation (in train_time), PiSSA's SVDs
        self.origin: dict[str, torch.Tensor] | None = None  # variant pissa: A0 and B0 (params' names), PiSSA's start

    # -- life -----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, setup: Setup, placement: Placement, seed: int) -> "Trial":
        """Step 0: the adapters as PEFT initialises them for this seed (the seed also fixes data order and
        dropout masks), a fresh AdamW, the dropout RNG right after the initialisation."""
        spec = setup.train
        torch.manual_seed(seed)  # adapter init (lora_A) and dropout
        is_pissa = placement.strategy.variant == PISSA
        saved = pissa.originals(setup.model, placement.modules) if is_pissa else {}  # PiSSA rewrites them
        t0 = time.perf_counter()
        try:
            peft_model = apply(setup.model, placement, dropout=spec.dropout, total_steps=setup.total_steps)
            spent = time.perf_counter() - t0  # PiSSA: its SVD of every adapted weight
            try:
                params = {base_name(n): torch.nn.Parameter(p.detach().clone())
                          for n, p in peft_model.named_parameters() if p.requires_grad}
                if placement.init != "default":  # A as a data-driven method computed it (B stays zero)
                    start_from(params, placement, setup.inits.get(placement.init))
                scales = {n: float(layer.scaling["default"]) for n, layer in lora_layers(peft_model).items()}
                rng = generator(setup.device).get_state() if spec.dropout > 0 else None
            finally:
                peft_model.unload()  # removes the LoRA layers without merging
        finally:
            pissa.restore(setup.model, saved)  # the base stays pristine
        trial = cls(placement, seed, setup.total_steps, params, scales, rng, spec)
        if is_pissa:  # where A and B started: the residual base of every attachment is computed from them
            trial.origin = {n: p.detach().clone() for n, p in params.items()}
            trial.method_time = spent
        return trial

    @property
    def done(self) -> bool:
        """Trained to the end of its run, or failed."""
        return self.error is not None or self.step >= self.total

    @property
    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Adapted module -> (A (r, in), B (out, r), scale): plain LoRA's tensors, as the fused engine uses them."""
        if self._adapters is None:
            self._adapters = {m: (self.params[f"{m}.lora_A.default.weight"], self.params[f"{m}.lora_B.default.weight"], s)
                              for m, s in self.scales.items()}
        return self._adapters

    def batch(self, setup: Setup, index: bool = False) -> dict[str, torch.Tensor]:
        """The batch of the next step (``data.batches.train_batches`` at this step), on the device."""
        per_epoch = batches_per_epoch(setup.train_set.lengths, setup.train.batch_size)
        epoch, j = divmod(self.step, per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(setup.train_set.lengths, setup.train.batch_size, self.seed, epoch))
        batch = collate(setup.train_set, self._order[1][j], setup.pad_id, index)
        return {k: v.to(setup.device) for k, v in batch.items()}

    def update(self, setup: Setup, loss: float, nll: float, n: int, batch: dict) -> None:
        """One optimizer step after the backward of this step's loss: clipping by the trial's own gradient
        norm, the schedule's learning rate for this step, AdamW, and the step's records."""
        spec = setup.train
        params = list(self.params.values())
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        for group in self.opt.param_groups:  # the whole run's schedule, whatever piece this step is in
            group["lr"] = spec.lr * lr_factor(self.step, self.total, spec)
        self.opt.step()
        if self.allocator is not None:  # AdaLoRA reads this step's gradients, so before zero_grad
            self._allocate(setup)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.curve.append((self.step, loss))
        self.tail.append((nll, n))
        self.tokens += int(batch["attention_mask"].sum())
        self.slots += batch["attention_mask"].numel()

    def _allocate(self, setup: Setup) -> None:
        """PEFT's AdaLoRA allocation after this step (``train.adalora``); a final count off the budget fails the trial."""
        t0 = time.perf_counter()
        with self.attached(setup) as peft_model:
            count = adalora.allocate(self.allocator, peft_model, self.placement, self.step + 1, self.total)
        self.method_time += time.perf_counter() - t0
        target = self.placement.allocation["target"]
        if count is not None and target is not None and abs(count - target) > BUDGET_TOLERANCE * target:
            raise TrialError(f"AdaLoRA's final allocation trains {count:,} parameters, more than "
                             f"{BUDGET_TOLERANCE:.0%} from the budget {target:,}")

    def penalty(self) -> torch.Tensor | float:
        """What the training loss adds beside the NLL: AdaLoRA's orthogonality penalty (0 for other variants)."""
        if self.allocator is None:
            return 0.0
        return adalora.orth_penalty(self.params, self.placement.allocation["orth_reg_weight"])

    @property
    def trained(self) -> Placement:
        """What the trial trains: its placement, or once AdaLoRA fixed its allocation, the ranks it kept."""
        if self.allocator is None or self.step < adalora.final_step(self.placement, self.total):
            return self.placement
        return adalora.kept_placement(self.placement, self.allocator)

    def fail(self, reason: str) -> None:
        self.error = reason

    @contextlib.contextmanager
    def attached(self, setup: Setup):
        """The base wrapped by PEFT with this trial's own tensors as its adapter weights (so training through
        it trains the trial, and accuracy and saving see the trained adapter); unwrapped again afterwards.
        Re-entrant: inside, ``attached`` yields the same wrapping."""
        if self._attached is not None:
            yield self._attached
            return
        peft_model = apply(setup.model, self.placement, dropout=setup.train.dropout, total_steps=self.total,
                           initialise=False)
        try:
            base = peft_model.get_base_model()
            for name, p in self.params.items():
                path, _, attr = name.rpartition(".")
                setattr(base.get_submodule(path), attr, p)
            if {id(p) for p in peft_model.parameters() if p.requires_grad} != {id(p) for p in self.params.values()}:
                raise TrialError(f"trial {self.placement.strategy}: its tensors do not match the PEFT wrapping")
            self._attached = peft_model
            with pissa.residual(peft_model, self.origin) if self.origin is not None else contextlib.nullcontext():
                yield peft_model
        finally:
            self._attached = None
            peft_model.unload()

    @property
    def is_attached(self) -> bool:
        return self._attached is not None

    @contextlib.contextmanager
    def rng_active(self, device):
        """While active, LoRA dropout on ``device`` draws from this trial's own RNG stream."""
        if self.rng is None:
            yield
            return
        gen = generator(device)
        outer = gen.get_state()
        gen.set_state(self.rng)
        try:
            yield
        finally:
            self.rng = gen.get_state()
            gen.set_state(outer)

    def finish(self, setup: Setup, adapter_dir: str | Path | None = None) -> TrialResult:
        """After the last evaluation: the non-finite check, accuracy (generation, on the adapted model) and
        the saved adapter, then the trial's TrialResult. Raises TrialError when the trial failed."""
        if self.error is not None:
            raise TrialError(self.error)
        ev = dict(self.eval or {})
        if "eval_loss" not in ev:
            raise TrialError(f"trial {self.placement.strategy} seed {self.seed} finished without an evaluation")
        if not math.isfinite(ev["eval_loss"]):  # a failed trial: no accuracy to generate, no adapter to save
            raise TrialError(f"non-finite eval loss ({ev['eval_loss']})")
        ev.pop("step", None)
        saved = None
        if setup.accuracy is not None or setup.forgetting is not None or adapter_dir is not None:
            with self.attached(setup) as peft_model:
                if setup.accuracy is not None:
                    t0 = time.perf_counter()
                    ev.update(setup.accuracy(peft_model))  # accuracy, accuracy_n
                    self.eval_time += time.perf_counter() - t0
                if setup.forgetting is not None:
                    ev.update(setup.forgetting.measure(peft_model))  # forgetting, forgetting_loss, forgetting_time_s
                if adapter_dir is not None:
                    with warnings.catch_warnings():  # AdaLoRA's modules pruned to rank 0 save empty A/B: not a shard
                        warnings.filterwarnings("ignore", message=".*LoRA tensor.*invalid shape")
                        saved = save_adapter(peft_model, adapter_dir) if self.origin is None else \
                            pissa.save_converted(peft_model, adapter_dir, self.origin, self.params)
        stats = train_stats(self.curve, self.tail, self.tokens, self.slots)
        extra = {} if not self.fused else {
            "fused_trials": self.fused["size"], "fused_padding_frac": 1.0 - self.fused["real"] / max(self.fused["slots"], 1),
            "group_train_time_s": self.fused["time"]}
        if self.allocator is not None or self.origin is not None:
            extra["method_time_s"] = self.method_time
        result = trial_result(self.trained, ev, {**stats, "prefix_cached_blocks": self.prefix_blocks}, self.curve,
                              self.train_time, self.eval_time, self.peak, saved, setup.train.dropout, **extra)
        result.evals = list(self.evals)
        if setup.forgetting is not None:
            result.measured = {"forgetting": setup.forgetting.key}
        return result

    def record(self, setup: Setup) -> PlacementRecord:
        """What the trial trains, as stored and exported."""
        return self.trained.record(dropout=setup.train.dropout)

    def progress(self) -> dict:
        """The figures of a trial that has not finished (paused at a rung, or stopped there): its training so far
        and its latest evaluation, named as a finished trial's metrics are."""
        stats = train_stats(self.curve, self.tail, self.tokens, self.slots) if self.curve else {"steps": 0}
        p = self.trained
        ev = {k: v for k, v in (self.eval or {}).items() if k != "step"}
        return {**ev, **stats, "trainable_params": p.trainable_params, "base_params": p.anatomy.base_params,
                "trainable_pct": p.trainable_pct, "n_modules": len(p.modules), "train_time_s": self.train_time,
                "eval_time_s": self.eval_time, "peak_mem_bytes": self.peak,
                "train_flops": train_flops(p.anatomy.base_params, p.trainable_params, self.tokens)}

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything ``restore`` needs to continue exactly: tensors, AdamW, RNG, step and records."""
        return {
            "version": CHECKPOINT_VERSION, "seed": self.seed, "total": self.total, "step": self.step,
            "modules": dict(self.placement.modules), "scales": dict(self.scales),
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.opt.state_dict(), "rng": self.rng,
            "curve": list(self.curve), "tail": list(self.tail), "tokens": self.tokens, "slots": self.slots,
            "train_time": self.train_time, "eval_time": self.eval_time, "peak": self.peak, "eval": self.eval,
            "evals": [[s, dict(e)] for s, e in self.evals],
            "error": self.error, "fused": dict(self.fused), "prefix_blocks": self.prefix_blocks,
            "allocator": self.allocator, "method_time": self.method_time, "origin": self.origin,
        }

    def save(self, path: str | Path) -> Path:
        """Write a resumable checkpoint into directory ``path`` (all or nothing)."""
        with atomic_dir(path) as tmp:
            torch.save(self.state_dict(), Path(tmp) / CHECKPOINT_FILE)
        return Path(path)

    @classmethod
    def restore(cls, path: str | Path, setup: Setup, placement: Placement) -> "Trial":
        """The trial saved at ``path``, ready to advance from where it stopped. TrialError when the checkpoint
        belongs to another placement or run length."""
        file = Path(path) / CHECKPOINT_FILE
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise TrialError(f"checkpoint {file} cannot be read ({type(e).__name__})") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise TrialError(f"checkpoint {file} is of version {state.get('version')}, not {CHECKPOINT_VERSION}")
        if state["modules"] != dict(placement.modules) or state["total"] != setup.total_steps:
            raise TrialError(f"checkpoint {file} belongs to another placement or run length")
        params = {n: torch.nn.Parameter(t.to(setup.device)) for n, t in state["params"].items()}
        trial = cls(placement, state["seed"], state["total"], params, state["scales"], state["rng"], setup.train)
        trial.opt.load_state_dict(state["optimizer"])
        trial.step, trial.rng = state["step"], state["rng"]
        trial.curve = [tuple(x) for x in state["curve"]]
        trial.tail = [tuple(x) for x in state["tail"]]
        trial.evals = [(int(s), dict(e)) for s, e in state["evals"]]
        for key in ("tokens", "slots", "train_time", "eval_time", "peak", "eval", "error", "fused", "prefix_blocks"):
            setattr(trial, key, state[key])
        trial.method_time = state.get("method_time", 0.0)
        if placement.strategy.variant == PISSA:
            if not state.get("origin"):
                raise TrialError(f"checkpoint {file} of a PiSSA trial lacks PiSSA's initial A and B")
            trial.origin = {n: t.to(setup.device) for n, t in state["origin"].items()}
        if trial.allocator is not None:  # AdaLoRA's importance EMAs and rank pattern, on the trial's device
            a = state.get("allocator") or adalora.new_state()
            trial.allocator = {**{k: {n: t.to(setup.device) for n, t in a[k].items()} for k in ("ipt", "avg", "unc")},
                               "pattern": a["pattern"]}
        return trial


def start_from(params: dict[str, torch.nn.Parameter], placement: Placement, init: dict | None) -> None:
    """Copy the A matrices of ``init`` (module -> (r, in)) into a trial's fresh adapter tensors, every placed module."""
    if not init or set(init) != set(placement.modules):
        raise TrialError(f"trial {placement.strategy.name}: no {placement.init} initialisation for exactly its modules")
    with torch.no_grad():
        for module, a in init.items():
            target = params[f"{module}.lora_A.default.weight"]
            if tuple(a.shape) != tuple(target.shape):
                raise TrialError(f"{placement.init} initialisation of {module} is {tuple(a.shape)}, the adapter's A "
                                 f"{tuple(target.shape)}")
            target.copy_(a.to(target.device, target.dtype))


def save_adapter(peft_model, target: str | Path) -> Path:
    """Save in PEFT format, all or nothing (see ``core.files.atomic_dir``)."""
    with atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(target)


def adapter_bytes(path: str | Path) -> int:
    """Bytes of a saved PEFT adapter: its weights and config (adapter_*), not the README PEFT adds."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("adapter_"))


def train_stats(curve: list, tail: list[tuple[float, int]], tokens: int, slots: int) -> dict:
    """A training run's metrics: tail holds (summed NLL, target count) per step; tokens / slots: real and
    padded token slots fed to the model."""
    last = tail[-max(1, len(tail) // 10):]
    return {
        "steps": len(curve),
        "train_tokens": tokens,
        "padding_frac": 1.0 - tokens / max(slots, 1),
        "train_loss_final": sum(s for s, _ in last) / max(1, sum(n for _, n in last)),
    }


def trial_result(p: Placement, ev: dict, stats: dict, curve: list, train_time: float, eval_time: float, peak: int,
                 saved: Path | None, dropout: float, **extra) -> TrialResult:
    """A trial's TrialResult from its measurements, as every engine records it.

    ev: the evaluation's figures (and accuracy); stats: ``train_stats`` (steps, train_tokens, padding_frac, ...);
    times in s; peak in bytes; saved: the adapter directory, or None; extra: engine-specific metrics."""
    metrics = {
        **ev,
        **stats,
        "trainable_params": p.trainable_params,
        "base_params": p.anatomy.base_params,
        "trainable_pct": p.trainable_pct,
        "n_modules": len(p.modules),
        "adapter_bytes": adapter_bytes(saved) if saved else p.adapter_bytes(),
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "tokens_per_s": stats["train_tokens"] / train_time if train_time > 0 else 0.0,
        "peak_mem_bytes": peak,
        "train_flops": train_flops(p.anatomy.base_params, p.trainable_params, stats["train_tokens"]),
        **extra,
    }
    return TrialResult(metrics=metrics, curve=curve, placement=p.record(dropout=dropout), adapter_dir=saved)
