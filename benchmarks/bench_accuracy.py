"""Benchmark: time per example of loraplace's accuracy generation, vs plain ``model.generate``.

Usage::

    python benchmarks/bench_accuracy.py                          # GSM8K test rows 0-31, base model
    python benchmarks/bench_accuracy.py --examples 64 --adapter studies/gsm8k/adapters/all_linear-s0-1234abcd
    python benchmarks/bench_accuracy.py --examples 2 --max-new-tokens 8 --no-compare   # a smoke run

Both sides answer the same GSM8K test questions with the embedded SmolLM2-135M (or it plus a
trained PEFT adapter from a study), greedy, in the same length-sorted, left-padded batches of
``--batch-size``, at most ``--max-new-tokens`` new tokens. loraplace (``train.generate.generate_greedy``,
what ``eval.accuracy=true`` runs) stops a row at the end-of-turn token or once its '#### <number>'
line is complete, and drops finished rows from the batch and the KV cache. The reference is the
usual call, ``model.generate(do_sample=False, eos_token_id=...)``: it stops a row only at eos and
keeps finished rows in the batch until the longest is done. Accuracy is scored the same way on
both sides (``data.answers.answer_matches``). Wall times in this process, one side after the other; compare
the ratio, not absolute seconds across machines. The base model rarely writes '####' or eos after a
plain ``Question: ... Answer:`` prompt, so without --adapter most rows run to the token limit
(the worst case); a trained adapter shows the usual case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from loraplace.core.config import DataSpec
from loraplace.data.answers import FINAL_LINE, answer_matches, final_line_stop
from loraplace.data.sources import load_examples
from loraplace.data.tokenize import encode_prompt
from loraplace.model.loading import load
from loraplace.train.generate import eos_ids, generate_greedy

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def _batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as answer_accuracy groups them
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_loraplace(model, tok, prompts, batch_size, max_new, device):
    stop_ids, stop = eos_ids(model, tok), final_line_stop(tok)  # GSM8K answers are numeric: the '####' line
    outs = [None] * len(prompts)
    t0 = time.perf_counter()
    for chunk in _batches(prompts, batch_size):
        for i, new in zip(chunk, generate_greedy(model, [prompts[i] for i in chunk], max_new, tok.pad_token_id,
                                                 stop_ids, stop, device)):
            outs[i] = new
    return time.perf_counter() - t0, outs


def run_hf_generate(model, tok, prompts, batch_size, max_new, device):
    pad, outs = tok.pad_token_id, [None] * len(prompts)
    stop_ids = sorted(eos_ids(model, tok))
    t0 = time.perf_counter()
    for chunk in _batches(prompts, batch_size):
        rows = [prompts[i] for i in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=stop_ids)
        for i, row in zip(chunk, gen[:, width:].tolist()):
            outs[i] = [t for t in row if t not in stop_ids and t != pad]
    return time.perf_counter() - t0, outs


def summarize(name, seconds, outs, examples, tok, max_new) -> dict:
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    hits = sum(answer_matches(t, e.answer) for t, e in zip(texts, examples))
    n = len(examples)
    at_limit = sum(len(o) >= max_new for o in outs)
    final_line = sum(len(o) < max_new and FINAL_LINE.search(t) is not None and t.endswith("\n")
                     for o, t in zip(outs, texts))
    row = {"outputs": outs, "side": name, "examples": n, "seconds": seconds, "s_per_example": seconds / n,
           "new_tokens": sum(map(len, outs)), "tokens_per_example": sum(map(len, outs)) / n,
           "accuracy": hits / n, "rows_at_token_limit": at_limit, "rows_ended_by_final_line": final_line}
    print(f"{name:12s} {seconds:8.1f} s  {seconds / n:7.2f} s/example  {row['tokens_per_example']:6.1f} new tokens/example  "
          f"accuracy {hits}/{n}  at limit {at_limit}, ended by '####' line {final_line}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32, help="GSM8K test rows to answer (from row 0)")
    ap.add_argument("--batch-size", type=int, default=16, help="generation batch (eval.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="eval.max_new_tokens")
    ap.add_argument("--template", default="plain", choices=["plain", "chat"], help="data.template")
    ap.add_argument("--adapter", help="a trained PEFT adapter directory (e.g. from a study's adapters/)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compare", action="store_true", help="skip the model.generate reference")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    test = GSM8K / "test.jsonl"
    if not test.is_file():
        print(f"GSM8K not found at {GSM8K}: this benchmark needs ../shared/data/gsm8k beside the checkout")
        return 1
    model, tok = load("smollm2-135m", dtype=torch.float32, device=args.device)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    spec = DataSpec(source=str(test), format="qa", template=args.template)
    examples = [e for e in load_examples(spec) if e.answer is not None][: args.examples]
    prompts = [encode_prompt(e, tok, spec) for e in examples]
    print(f"GSM8K test rows 0-{len(examples) - 1}, batch {args.batch_size}, at most {args.max_new_tokens} new tokens, "
          f"{args.device}, torch threads {torch.get_num_threads()}, adapter {args.adapter or 'none (base model)'}",
          flush=True)
    with torch.inference_mode():
        warm = prompts[: args.batch_size]  # first calls pay one-off allocation and kernel selection: not timed
        run_loraplace(model, tok, warm, args.batch_size, 4, args.device)
        if not args.no_compare:
            run_hf_generate(model, tok, warm, args.batch_size, 4, args.device)
        rows = [summarize("loraplace", *run_loraplace(model, tok, prompts, args.batch_size, args.max_new_tokens,
                                                      args.device), examples, tok, args.max_new_tokens)]
        if not args.no_compare:
            rows.append(summarize("generate", *run_hf_generate(model, tok, prompts, args.batch_size,
                                                               args.max_new_tokens, args.device),
                                  examples, tok, args.max_new_tokens))
            lp, hf = rows[0].pop("outputs"), rows[1].pop("outputs")
            same = sum(h[: len(mine)] == mine for mine, h in zip(lp, hf))  # loraplace may stop earlier, never differ
            print(f"speed-up x{rows[1]['seconds'] / rows[0]['seconds']:.2f} per example; loraplace's tokens are a prefix "
                  f"of generate's in {same}/{len(lp)} rows", flush=True)
        for r in rows:
            r.pop("outputs", None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
