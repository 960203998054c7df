"""Shared test helpers: repository paths, toy token sets, and the comparisons the engine tests share.

Usage: ``from toys import GSM8K, PAD, toy_set, assert_same_adapter, tiny_study, tiny_workspace, toy_workspace, run``
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import tiny_models
import torch
import transformers as T
from safetensors.torch import load_file

from loraplace.core.config import EvalSpec, StudyConfig, TrainSpec
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.batches import train_batches
from loraplace.data.tokenize import TokenizedSet
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import Placement, resolve
from loraplace.placement.strategy import Strategy
from loraplace.study.executor import run_group, run_one
from loraplace.study.plan import TrialTask, segment
from loraplace.study.workspace import Workspace
from loraplace.train.schedule import total_steps
from loraplace.train.trial import Setup

REPO = Path(__file__).resolve().parents[1]  # the checkout
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"  # the shared real data, beside the checkout (may be absent)

PAD = 0
# study.db as the first release wrote it (no claims, rungs, steps or measured columns; four statuses): migration tests
FIRST_SCHEMA = """
CREATE TABLE trials (trial_id TEXT PRIMARY KEY, strategy TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')), error TEXT,
    config_json TEXT NOT NULL, placement_json TEXT NOT NULL DEFAULT '{}', metrics_json TEXT NOT NULL DEFAULT '{}',
    curve_json TEXT NOT NULL DEFAULT '[]', env_json TEXT NOT NULL DEFAULT '{}', adapter_path TEXT,
    created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT);
CREATE TABLE meta (key TEXT PRIMARY KEY, value_json TEXT NOT NULL);
"""
REL = 1e-4  # fp32: fused and sequential per-step and eval losses agree to this relative tolerance
# 21 examples in batches of 4: a short last batch each epoch, at a seed-dependent step; 12 steps: two epochs
SPEC = dict(lr=2e-2, steps=12, batch_size=4, warmup=0.2, schedule="cosine", rank=4, alpha=8, max_grad_norm=0.5)


def toy_set(n: int, seed: int = 0, plen: tuple[int, int] = (3, 14)) -> TokenizedSet:
    """Prompt: random tokens of random length; completion: a token fixed by the prompt, then a fixed tail."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        k = int(torch.randint(plen[0], plen[1], (1,), generator=g))
        prompt = torch.randint(3, tiny_models.VOCAB, (k,), generator=g).tolist()
        completion = [3 + prompt[0] % 4, 9, 10, 2]
        ids.append(prompt + completion)
        labels.append([IGNORE_INDEX] * k + completion)
    return TokenizedSet(input_ids=ids, labels=labels)


def setup(model, ts: TokenizedSet, spec: TrainSpec, eval_set: TokenizedSet | None = None, eval_batch: int = 8,
          prefix_cache_bytes: int | None = None, accuracy=None) -> Setup:
    """A Setup evaluating on the train set unless ``eval_set`` is given."""
    return Setup(model, ts, eval_set if eval_set is not None else ts, spec, EvalSpec(batch_size=eval_batch), PAD,
                 accuracy=accuracy, prefix_cache_bytes=prefix_cache_bytes)


def gpt2_without_dropout():
    """GPT-2 (Conv1D layers) with its own dropouts off: fusable (with them on it runs sequentially)."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, vocab_size=tiny_models.VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


def assert_same_adapter(seq_dir, fused_dir, rel: float = 1e-3):
    """Same config and tensors; each tensor within ``rel`` of its largest entry. In fp32 the fused
    matmuls round differently and AdamW's normalised steps carry that noise into the weights (a few
    1e-4 of a tensor's scale after 12 steps at lr 2e-2); in float64 the two agree to 1e-15."""
    assert json.loads((seq_dir / "adapter_config.json").read_text()) == json.loads((fused_dir / "adapter_config.json").read_text())
    a, b = load_file(seq_dir / "adapter_model.safetensors"), load_file(fused_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        assert float((a[k] - b[k]).abs().max()) <= rel * float(a[k].abs().max()), k


def deep(arch: str, **cfg) -> torch.nn.Module:
    """A 4-block tiny model (GPT-2 without its dropouts), with ``cfg`` set on its config."""
    config = gpt2_without_dropout().config if arch == "gpt2" else tiny_models.config(arch)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("layer_types", "n_layer")}  # per-layer lists follow
    config = type(config)(**{**fields, "num_hidden_layers": 4, **cfg})
    assert config.num_hidden_layers == 4
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def upper(anat):
    """Trials that all leave blocks 0-1 alone (the group's lowest adapted block is 2; one starts at 3)."""
    strategies = [(Strategy("top_half", "all", "last:50%"), 0), (Strategy("attn3", "attn", "3"), 1),
                  (Strategy("ranks", "all", "2-3", rank={"attn": 2, "mlp": 6}), 2), (Strategy("mlp_top", "mlp", "2,3"), 0)]
    return [resolve(s, anat, rank=4, alpha=8) for s, _ in strategies], [seed for _, seed in strategies]


def prefix_runs(model, anat) -> list[bool]:
    """Counts training forwards that really compute block 0 (a hook on its first linear layer: a
    bypassed block runs none of its layers)."""
    first = next(m for m in model.get_submodule(anat.blocks_path)[0].modules() if isinstance(m, (torch.nn.Linear, T.Conv1D)))
    runs: list[bool] = []
    first.register_forward_hook(lambda mod, args, out: runs.append(True) if mod.training else None)
    return runs


def steps_with_new_examples(ts, spec, seeds) -> tuple[int, int]:
    """(steps whose stacked batch holds an example not seen at an earlier step, the last such step)."""
    steps = total_steps(spec, len(ts))
    streams = [train_batches(ts, spec.batch_size, s, PAD, steps, index=True) for s in seeds]
    seen, misses, last = set(), 0, 0
    for step in range(1, steps + 1):
        idx = {i for b in (next(g) for g in streams) for i in b["index"].tolist()}
        if not idx <= seen:
            misses, last = misses + 1, step
        seen |= idx
    return misses, last


def tiny_study(tmp_path, strategies: list[str], train: dict | None = None, **over) -> StudyConfig:
    """A study on the tiny Llama for method tests: 48 built-in examples (8 held out) of at most 96 tokens, one seed,
    rank 4 / alpha 8, lr 1e-2, 2 steps of 8, no forgetting set; ``train`` updates the train section, ``over`` the rest."""
    data = {"out": str(tmp_path / "study"), "seeds": [0], "strategies": strategies,
            "data": {"limit": 48, "eval_size": 8, "max_length": 96},
            "train": {"steps": 2, "batch_size": 8, "rank": 4, "alpha": 8, "lr": 1e-2, **(train or {})},
            "eval": {"forgetting": False}}
    data.update(over)
    return StudyConfig.from_dict(data)


def tiny_workspace(cfg: StudyConfig):
    """The study's Workspace on a fresh tiny Llama and its tokenizer (no files read)."""
    from loraplace.study.workspace import Workspace

    return Workspace.build(cfg, (tiny_models.build("llama"), tiny_models.tokenizer()))


def exported_layers(study_dir, strategy: str, capsys) -> tuple[dict, str]:
    """``loraplace export --format peft`` of ``strategy``, rebuilt on a fresh tiny Llama with PEFT's LoraConfig: its
    LoRA layers (base module name -> layer) and what the export wrote on stderr."""
    from peft import LoraConfig, get_peft_model

    from loraplace.cli import main
    from loraplace.placement.peft import lora_layers

    assert main(["export", str(study_dir), "--strategy", strategy, "--format", "peft"]) == 0
    out = capsys.readouterr()
    exported = json.loads(out.out)
    exported.pop("peft_type")
    return lora_layers(get_peft_model(tiny_models.build("llama"), LoraConfig(**exported))), out.err


def run_batches(trial, setup) -> list[dict]:
    """Every batch ``trial`` will train on, in order (what a reference loop outside loraplace is fed); the trial
    is left at the step it was at."""
    at, out = trial.step, []
    for step in range(setup.total_steps):
        trial.step = step
        out.append(trial.batch(setup))
    trial.step = at
    return out


# -- trials through the path a study runs them (study.executor) -------------------------------------------------------
@dataclass
class ToyWorkspace(Workspace):
    """A study's Workspace on a given model and token sets; ``placements`` (trial id -> Placement) stand in for what a
    study config resolves, so a test trains any placement (an infinite alpha, a 4-block model's subsets)."""

    placements: dict = field(default_factory=dict)

    def placement(self, task: TrialTask) -> Placement:
        return self.placements[task.trial_id]


def toy_workspace(model, ts: TokenizedSet, spec: TrainSpec, eval_set: TokenizedSet | None = None, eval_batch: int = 8,
                  race: dict | None = None, prefix_cache_bytes: int | None = None) -> ToyWorkspace:
    """A ToyWorkspace evaluating on the train set unless ``eval_set`` is given; ``race``: the study's race section
    (its ``record`` rungs are evaluated in every study, ``at`` pauses trials there with a checkpoint)."""
    cfg = StudyConfig.from_dict({"eval": {"batch_size": eval_batch, "forgetting": False}, "race": race or {}})
    cfg.train = spec
    return ToyWorkspace(cfg, model, SimpleNamespace(pad_token_id=PAD), analyze(model), ts,
                        eval_set if eval_set is not None else ts, [], "cpu", prefix_cache_bytes=prefix_cache_bytes)


def tasks(ws: ToyWorkspace, placements: list, seeds: list[int], adapter_dirs: list | None = None,
          checkpoint_dirs: list | None = None) -> list[TrialTask]:
    """The study's tasks of these trials (their placements registered in ``ws``), cut as a study cuts them
    (``study.plan.segment``: to the first racing rung or the end, evaluated at the rungs on the way)."""
    out = []
    for i, (p, seed) in enumerate(zip(placements, seeds)):
        tid = f"{i}-{p.strategy.name}-s{seed}"
        ws.placements[tid] = p
        adapter = adapter_dirs[i] if adapter_dirs else None
        ckpt = checkpoint_dirs[i] if checkpoint_dirs else None
        task = TrialTask(tid, p.strategy.name, seed, dict(p.modules), None if adapter is None else str(adapter),
                         checkpoint_dir=None if ckpt is None else str(ckpt))
        out.append(segment(task, 0, ws.setup.total_steps, ws.cfg.race))
    return out


def outcomes(ws: ToyWorkspace, todo: list[TrialTask], fuse: bool = False) -> list:
    """What the executor makes of ``todo`` (``run_group`` when ``fuse``, else ``run_one`` each), per task: its
    TrialResult, the error text it is stored with ('TrialError: ...'), or its Pause at a racing rung."""
    done = run_group(ws, todo) if fuse else [run_one(ws, t) for t in todo]
    return [o.result if o.result is not None else o.error if o.error is not None else o.paused for o in done]


def run(ws: ToyWorkspace, placements: list, seeds: list[int], adapter_dirs: list | None = None, fuse: bool = False) -> list:
    """These trials from start to finish through the executor (``outcomes`` of their ``tasks``)."""
    return outcomes(ws, tasks(ws, placements, seeds, adapter_dirs), fuse)
