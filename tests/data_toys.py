"""Shared data-test helpers: a word-level tokenizer built in-test (optionally with a chat template or BOS), rows
in every file format, and loading them.

Usage: ``from data_toys import make_tokenizer, write, load, ROWS, needs_gsm8k``
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loraplace.core.config import DataSpec
from loraplace.data.examples import Example
from loraplace.data.sources import load_examples
from toys import GSM8K

needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason=f"GSM8K not found at {GSM8K}")

CORPUS = ["Question Answer Instruction Input Response what is two plus two four add the numbers",
          "the quick brown fox jumps over a lazy dog and then sleeps all day long user assistant"]
CHAT = ("{% for m in messages %}< {{ m.role }} > {{ m.content }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}< assistant > {% endif %}")


def make_tokenizer(chat: bool = True, bos: bool = False, extra: str = "") -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(CORPUS + [extra], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>", "<bos>"]))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>")
    tok.chat_template = CHAT if chat else None
    return tok


ROWS = [{"instruction": f"add the numbers {i}", "input": "two plus two" if i % 2 else "", "output": "four"}
        for i in range(6)]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(path, **kw) -> list[Example]:
    return load_examples(DataSpec(source=str(path), **kw))

