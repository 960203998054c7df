"""What a trained routed-expert adapter costs in a training step: attention_only vs mlp_only (the experts) vs all_linear
at equal rank, on a tiny random-init Mixtral-like model, loraplace's sequential engine, CPU.

Usage::

    python benchmarks/bench_moe.py                    # hidden 256, 8 experts (top 2), 4 blocks, batch 8 x 512, rank 16
    python benchmarks/bench_moe.py --steps 10 --rank 8 --json moe.json

Each placement runs in a child process of its own (one after the other, in this one run), so the RSS high-water
mark of one does not carry into the next; the child builds the same model (seed 0) and batches, trains one warm-up
step, then ``--steps`` steps through ``train.sequential`` and reports:

* ``step_s``: the mean wall time of a step (forward, backward, AdamW) after the warm-up;
* ``peak_rss``: the process's RSS high-water mark over those steps (``train.memory``, as a study's peak memory);
* ``saved``: bytes autograd keeps for the backward pass in one step's forward (``saved_tensors_hooks``, each storage
  once, the model's own parameters left out). PEFT's ParamWrapper adds B A to an expert stack by materialising
  W + scale B A (experts x out x in) in every forward, and the expert loop keeps slices of it for the backward:
  this column shows that cost apart from the allocator's.

The table gives each figure and its ratio to attention_only; compare ratios, not absolute times, across machines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STRATEGIES = ("attention_only", "mlp_only", "all_linear")


def build_model(hidden: int, experts: int, blocks: int):
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MixtralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_local_experts=experts,
                          num_experts_per_tok=2, num_hidden_layers=blocks, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def token_set(n: int, length: int, target: int):
    """n examples of ``length`` random tokens, the last ``target`` of them the completion (every batch full width)."""
    import torch

    from loraplace.core.metrics import IGNORE_INDEX
    from loraplace.data.tokenize import TokenizedSet

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (n, length), generator=g).tolist()
    return TokenizedSet(input_ids=ids, labels=[[IGNORE_INDEX] * (length - target) + row[-target:] for row in ids])


def saved_bytes(trial, setup) -> int:
    """Bytes autograd saves in one training forward of ``trial`` (each storage once, model parameters excluded)."""
    import torch

    from loraplace.train.loss import target_nll

    with trial.attached(setup) as peft_model:
        peft_model.train()
        params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nll, _ = target_nll(peft_model, trial.batch(setup))
        del nll
    return sum(seen.values())


def one(args) -> dict:
    """The child: one placement's figures."""
    from loraplace.core.config import EvalSpec, TrainSpec
    from loraplace.model.anatomy import analyze
    from loraplace.placement.resolve import resolve
    from loraplace.placement.strategy import get_strategy
    from loraplace.train import sequential
    from loraplace.train.trial import Setup

    model = build_model(args.hidden, args.experts, args.blocks)
    ts = token_set(args.batch * (args.steps + 2), args.length, args.length // 4)
    spec = TrainSpec(steps=args.steps + 2, batch_size=args.batch, rank=args.rank, alpha=2 * args.rank, lr=1e-3)
    setup = Setup(model, ts, ts, spec, EvalSpec(batch_size=args.batch), pad_id=0)
    p = resolve(get_strategy(args.one), analyze(model), rank=args.rank, alpha=2 * args.rank)
    trial = sequential.start(setup, p, seed=0)
    saved = saved_bytes(trial, setup)
    sequential.advance(setup, [trial], 1, desc="warm-up")
    trial.train_time, trial.peak = 0.0, 0
    sequential.advance(setup, [trial], args.steps, desc=args.one)
    return {"strategy": args.one, "trainable": p.trainable_params, "base": p.anatomy.base_params,
            "step_s": trial.train_time / args.steps, "peak_rss": trial.peak, "saved": saved,
            "loss": trial.curve[-1][1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--one", choices=STRATEGIES, help=argparse.SUPPRESS)  # the child's placement
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return 0
    rows = []
    for name in STRATEGIES:
        argv = [sys.executable, __file__, "--one", name] + [f"--{k}={getattr(args, k)}" for k in
                                                            ("hidden", "experts", "blocks", "batch", "length", "rank", "steps")]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(f"Mixtral-like: hidden {args.hidden}, {args.experts} experts (top 2), {args.blocks} blocks, "
          f"{rows[0]['base']:,} base parameters; batch {args.batch} x {args.length} tokens, rank {args.rank}, "
          f"mean of {args.steps} steps after one warm-up, sequential engine")
    print(f"{'strategy':<16}{'trainable':>12}{'step (s)':>10}{'x':>7}{'peak RSS (MB)':>15}{'x':>7}"
          f"{'saved (MB)':>12}{'x':>7}")
    for r in rows:
        print(f"{r['strategy']:<16}{r['trainable']:>12,}{r['step_s']:>10.3f}{r['step_s'] / ref['step_s']:>7.2f}"
              f"{r['peak_rss'] / 1e6:>15.1f}{r['peak_rss'] / ref['peak_rss']:>7.2f}"
              f"{r['saved'] / 1e6:>12.1f}{r['saved'] / ref['saved']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
