"""Data sources: every file format, the hub path, GSM8K, the built-in set, the seeded split and a fixed eval set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from loraplace.core.config import DataSpec
from loraplace.data.examples import DataError, Example, format_example
from loraplace.data.sources import load_examples, split_examples, train_eval_examples
from toys import GSM8K
from data_toys import ROWS, load, needs_gsm8k, write


# -- loading ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_type_loads_the_same_examples(tmp_path, ext):
    if ext == ".parquet":
        pytest.importorskip("pyarrow")
    got = load(write(tmp_path / f"d{ext}", ROWS))
    assert got == load(write(tmp_path / "ref.jsonl", ROWS))
    assert len(got) == 6
    assert got[0].prompt == "### Instruction:\nadd the numbers 0\n\n### Response:\n"
    assert got[1].prompt == "### Instruction:\nadd the numbers 1\n\n### Input:\ntwo plus two\n\n### Response:\n"
    assert got[1].completion == "four"


def test_json_lines_in_a_json_file_and_wrapped_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert len(load(p)) == 6
    p.write_text(json.dumps({"data": ROWS}))
    assert len(load(p)) == 6


@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"question": "a", "answer": "b"}, "qa"),
    ({"text": "a b"}, "text"),
])
def test_format_auto_detection(tmp_path, row, fmt):
    (ex,) = load(write(tmp_path / "d.jsonl", [row]))
    assert ex == format_example(fmt, row, "x")
    assert (ex.prompt, ex.completion) == {
        "alpaca": ("### Instruction:\na\n\n### Response:\n", "b"),
        "prompt_completion": ("a", "b"),
        "qa": ("Question: a\nAnswer:", " b"),
        "text": ("", "a b"),
    }[fmt]


def test_explicit_format_and_undetectable_fields(tmp_path):
    p = write(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "text": "t"}])
    assert load(p, format="text")[0].completion == "t"
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'prompt'"):
        load(p, format="prompt_completion")
    p = write(tmp_path / "e.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"e.jsonl:1: cannot tell the format from fields \['foo'\]"):
        load(p)


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError) as e:
        load(p)
    msg = str(e.value)
    assert "bad.jsonl:3:" in msg and "not valid JSON" in msg and "\n" not in msg
    p = tmp_path / "bad.json"
    p.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"bad.json:3: not valid JSON"):
        load(p)
    p.write_text('[1, 2]')
    with pytest.raises(DataError, match=r"bad.json: item 1: expected a JSON object"):
        load(p)


def test_missing_field_names_field_and_line(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}, {"question": "q3"}]
    with pytest.raises(DataError, match=r"d.jsonl:3: missing field 'answer' \(format qa"):
        load(write(tmp_path / "d.jsonl", rows))
    p = tmp_path / "d.csv"
    p.write_text('question,answer\nq1,a1\n"multi\nline q2",a2\nq3,a3,extra\n')
    with pytest.raises(DataError, match=r"d.csv:5: more cells"):
        load(p)
    p.write_text("question,other\nq1,a1\n")
    with pytest.raises(DataError, match=r"d.csv:2: missing field 'answer'"):
        load(p, format="qa")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'answer' must be text, got list"):
        load(write(tmp_path / "d.jsonl", [{"question": "q", "answer": [1]}]))


def test_missing_file_unsupported_type_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load(tmp_path / "d.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="e.jsonl: no examples"):
        load(tmp_path / "e.jsonl")


def test_hub_without_datasets_or_network_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError) as e:
        load_examples(DataSpec(source="hub:openai/gsm8k:main"))
    assert "needs the 'datasets' package" in str(e.value) and "\n" not in str(e.value)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError) as e:
        load_examples(DataSpec(source="hub:openai/gsm8k:main"))
    assert "ConnectionError: Couldn't reach" in str(e.value) and "\n" not in str(e.value)

    calls = []
    fake = lambda repo, conf, split: calls.append((repo, conf, split)) or [{"question": "q", "answer": "x #### 7"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake))
    assert load_examples(DataSpec(source="hub:openai/gsm8k:main", hub_split="test"))[0].answer == "7"
    assert calls == [("openai/gsm8k", "main", "test")]


def test_gsm8k_answer_extraction():
    ex = format_example("qa", {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,080"}, "x")
    assert ex.answer == "1080" and ex.completion == " 3 + 4 = <<3+4=7>>7\n#### 1,080"


@needs_gsm8k
def test_gsm8k_files_load_as_qa_with_numeric_answers():
    ex = load_examples(DataSpec(source=str(GSM8K / "test.jsonl")))
    assert len(ex) == 1319
    assert all(e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:") for e in ex)
    assert all(e.answer.lstrip("-").replace(".", "").isdigit() for e in ex)


# -- built-in dataset -----------------------------------------------------------------------------------
def test_builtin_dataset_is_deterministic_and_substantial():
    ex = load_examples(DataSpec())
    # the same rows in a fresh interpreter with another hash seed (no dependence on set order)
    code = "from loraplace.data.builtin import builtin_rows; import json; print(json.dumps(builtin_rows()))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert [format_example("qa", r, "x") for r in json.loads(fresh)] == ex
    assert 500 <= len(ex) <= 1200
    assert len({e.prompt for e in ex}) == len(ex)
    assert all(e.prompt.startswith("Question: ") and e.completion.startswith(" ") and e.answer for e in ex)
    assert max(len(e.prompt) + len(e.completion) for e in ex) < 300
    kinds = {e.prompt.split(":")[1].split("`")[0].strip() for e in ex}
    assert len(kinds) >= 10
    reverse = next(e for e in ex if "Reverse the order" in e.prompt)
    words = reverse.prompt.split(": ", 2)[2].split("\n")[0].split()
    assert reverse.answer == " ".join(words[::-1])


# -- split --------------------------------------------------------------------------------------------
EXAMPLES = [Example(f"p{i}", f" c{i}") for i in range(100)]


def test_split_is_seeded_and_eval_is_stable():
    spec = DataSpec(eval_size=10)
    train, evals = split_examples(EXAMPLES, spec)
    assert (train, evals) == split_examples(EXAMPLES, spec)
    assert len(evals) == 10 and len(train) == 90 and set(train).isdisjoint(evals)
    assert set(train) | set(evals) == set(EXAMPLES)
    assert evals != EXAMPLES[:10]  # shuffled
    assert split_examples(EXAMPLES, DataSpec(eval_size=10, split_seed=1))[1] != evals
    limited_train, limited_eval = split_examples(EXAMPLES, DataSpec(eval_size=10, limit=30))
    assert limited_eval == evals and len(limited_train) == 20
    assert len(split_examples(EXAMPLES, DataSpec(eval_size=0.25))[1]) == 25


@pytest.mark.parametrize("kw, which", [({"eval_size": 100}, "train"), ({"eval_size": 0.001}, "eval"),
                                       ({"eval_size": 5, "limit": 5}, "train")])
def test_empty_split_is_an_error(kw, which):
    with pytest.raises(DataError, match=f"the {which} split is empty"):
        split_examples(EXAMPLES, DataSpec(**kw))


# -- a fixed eval set ------------------------------------------------------------------------------------
def test_eval_source_is_used_as_given_and_all_of_source_trains(tmp_path, caplog):
    train_rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                  for i in range(20)]
    eval_rows = [{"question": f"e{i}", "answer": f"x #### {i}"} for i in range(7)]  # another format: detected per file
    src, ev = write(tmp_path / "train.jsonl", train_rows), write(tmp_path / "test.jsonl", eval_rows)
    spec = DataSpec(source=str(src), eval_source=str(ev))
    train, evals = train_eval_examples(spec)
    assert evals == load_examples(DataSpec(source=str(ev)))  # file order, all of it (eval_size unused)
    assert sorted(train, key=lambda e: int(e.answer[1:])) == load_examples(DataSpec(source=str(src)))
    assert (train, evals) == train_eval_examples(spec)  # the same for every trial
    limited, first = train_eval_examples(DataSpec(source=str(src), eval_source=str(ev), limit=5, eval_limit=3))
    assert limited == train[:5] and first == evals[:3]
    assert train_eval_examples(DataSpec(source=str(src), eval_source=str(ev), split_seed=1))[0] != train
    assert "also in the train set" not in caplog.text
    train_eval_examples(DataSpec(source=str(src), eval_source=str(src), eval_limit=4))
    assert "4 of the 4 eval examples" in caplog.text and "also in the train set" in caplog.text
    with pytest.raises(DataError, match="data.eval_source: not set"):
        load_examples(DataSpec(source=str(src)), eval_set=True)


def test_eval_source_from_the_hub_uses_eval_hub_split(monkeypatch, tmp_path):
    calls = []
    fake = lambda repo, conf, split: calls.append((repo, conf, split)) or [{"question": "q", "answer": "x #### 7"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake))
    src = write(tmp_path / "t.jsonl", [{"question": "a", "answer": "b"}])
    train, evals = train_eval_examples(DataSpec(source=str(src), eval_source="hub:openai/gsm8k:main"))
    assert calls == [("openai/gsm8k", "main", "test")] and evals[0].answer == "7" and len(train) == 1


def test_eval_settings_are_checked():
    from loraplace.core.config import ConfigError, StudyConfig

    with pytest.raises(ConfigError, match="data.eval_limit: applies to data.eval_source, which is not set"):
        StudyConfig.load(overrides=["data.eval_limit=10"])
    with pytest.raises(ConfigError, match="data.eval_limit: must be > 0"):
        StudyConfig.load(overrides=["data.eval_source=t.jsonl", "data.eval_limit=0"])
    with pytest.raises(ConfigError, match="data.eval_source: empty"):
        StudyConfig.load(overrides=["data.eval_source=' '"])
    cfg = StudyConfig.load(overrides=["data.eval_source=t.jsonl", "data.format=sharegpt"])
    assert cfg.data.eval_source == "t.jsonl" and cfg.data.eval_hub_split == "test" and cfg.data.format == "sharegpt"


@needs_gsm8k
def test_gsm8k_train_and_test_files_as_train_and_fixed_eval():
    train, evals = train_eval_examples(DataSpec(source=str(GSM8K / "train.jsonl"),
                                                  eval_source=str(GSM8K / "test.jsonl"), eval_limit=100))
    assert len(train) == 7473 and evals == load_examples(DataSpec(source=str(GSM8K / "test.jsonl")))[:100]
