"""One trial's running state and its lifecycle: start, advance, evaluate, finish (checkpoints: ``train.checkpoint``).

Usage::

    setup = Setup(model, train_set, eval_set, train_spec, eval_spec, pad_id=0)
    trial = Trial.start(setup, placement, seed=0)      # adapters initialised by PEFT, AdamW, RNG, step 0
    sequential.advance(setup, [trial], 10)             # or fused.advance(setup, trials, 10): 10 optimizer steps
    checkpoint.save(trial, path)                       # resumable: checkpoint.restore(path, setup, placement)
    sequential.evaluate(setup, [trial])
    result = trial.finish(setup, adapter_dir)          # accuracy, saved adapter, the TrialResult (train.result)

A Trial owns what makes one run differ from another: its placement and seed, its adapter tensors, AdamW
state, LoRA-dropout RNG state, the step it is at (which is also where it is in the data:
``data.batches.train_batches``) and what it has measured. The learning rate of every step follows the
whole run's schedule, however the run is cut into pieces, so a trial advanced in pieces (checkpointed and
restored between them, even in another process) computes exactly what it computes in one go. The
engines (``train.sequential``, ``train.fused``) only decide how a step's rows go through the frozen base.
What its variant adds (``placement.variants``: AdaLoRA's rank allocator, PiSSA's residual base) the trial asks the
variant (``Trial.variant``) at each point of its life; the variant's own state is ``Trial.variant_state``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loraplace.core.config import EvalSpec, TrainSpec
from loraplace.core.errors import LoraplaceError
from loraplace.data.batches import batches_per_epoch, collate, epoch_order
from loraplace.data.tokenize import TokenizedSet
from loraplace.placement.peft import apply, base_name, lora_layers
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import Placement
from loraplace.train import result as R
from loraplace.train.schedule import lr_factor, total_steps


class TrialError(LoraplaceError, RuntimeError):
    """A trial failed in a way worth recording (e.g. a non-finite loss); the message is one line."""


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
    rung_eval_set: TokenizedSet | None = None  # what rung evaluations score (race.eval_limit); None: eval_set

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
    """A running trial. Build it with ``start`` (step 0) or ``train.checkpoint.restore`` (from a checkpoint)."""

    def __init__(self, placement: Placement, seed: int, total: int, params: dict[str, torch.nn.Parameter],
                 scales: dict[str, float], rng: torch.Tensor | None, spec: TrainSpec):
        self.placement, self.seed, self.total = placement, seed, total
        self.params = params  # base-model parameter name -> trainable tensor, in model order (AdamW's order)
        self.scales = scales  # adapted module -> LoRA scaling (alpha / r)
        self.rng = rng  # LoRA-dropout generator state; None without dropout
        self.lr = spec.lr  # its peak learning rate (a study's trials may differ: the learning-rate search)
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
        self.variant = placement.variant  # how its adapters learn (placement.variants): asked at each point below
        self.variant_state = None  # what the variant keeps for this trial (Variant.start, checkpointed by the variant)
        self.replayed = False  # read from a snapshot without AdamW's state (train.checkpoint.replayed): not to train on

    # -- life -----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, setup: Setup, placement: Placement, seed: int) -> "Trial":
        """Step 0: the adapters as PEFT initialises them for this seed (the seed also fixes data order and
        dropout masks), a fresh AdamW, the dropout RNG right after the initialisation."""
        spec = setup.train
        torch.manual_seed(seed)  # adapter init (lora_A) and dropout
        with placement.variant.initialising(setup.model, placement):  # the base stays pristine (PiSSA rewrites it)
            t0 = time.perf_counter()
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
        trial = cls(placement, seed, setup.total_steps, params, scales, rng, spec)
        trial.variant_state = trial.variant.start(trial, spent)
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

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether this step's loss is finite; if not, the trial has failed (it advances no further)."""
        if torch.isfinite(loss):
            return True
        self.fail(f"non-finite train loss ({loss.item()}) at step {self.step + 1}")
        return False

    def update(self, setup: Setup, loss: float, nll: float, n: int, batch: dict) -> None:
        """One optimizer step after the backward of this step's loss: clipping by the trial's own gradient
        norm, the schedule's learning rate for this step, AdamW, the variant's own step, and the step's records
        (none when the variant failed the trial: ``error`` says why)."""
        spec = setup.train
        params = list(self.params.values())
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        for group in self.opt.param_groups:  # the whole run's schedule, whatever piece this step is in
            group["lr"] = self.lr * lr_factor(self.step, self.total, spec)
        self.opt.step()
        failed = self.variant.after_step(self, setup)  # e.g. AdaLoRA's allocation: it reads this step's gradients
        self.opt.zero_grad(set_to_none=True)
        if failed:  # the variant failed the trial (AdaLoRA's final count off the budget): it advances no further
            self.fail(failed)
            return
        self.step += 1
        self.curve.append((self.step, loss))
        self.tail.append((nll, n))
        self.tokens += int(batch["attention_mask"].sum())
        self.slots += batch["attention_mask"].numel()

    def penalty(self) -> torch.Tensor | float:
        """What the training loss adds beside the NLL: the variant's (AdaLoRA's orthogonality penalty), else 0."""
        return self.variant.penalty(self)

    @property
    def trained(self) -> Placement:
        """What the trial trains now: its placement, or what its variant made of it (the ranks AdaLoRA kept)."""
        return self.variant.trained(self)

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
            with self.variant.attached(self, peft_model):  # e.g. PiSSA's residual base weights
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

    def finish(self, setup: Setup, adapter_dir: str | Path | None = None) -> R.TrialResult:
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
                    saved = self.variant.save_adapter(self, peft_model, adapter_dir)
        return R.result(self, setup, ev, saved)

    def record(self, setup: Setup) -> PlacementRecord:
        """What the trial trains, as stored and exported."""
        return self.trained.record(dropout=setup.train.dropout)

    def progress(self) -> dict:
        """The figures of a trial that has not finished (paused at a rung, or stopped there): its training so far
        and its latest evaluation, named as a finished trial's metrics are."""
        return R.figures(self, {k: v for k, v in (self.eval or {}).items() if k != "step"})


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
