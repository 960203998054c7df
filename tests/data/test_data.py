"""Data loading, split, tokenization and batching; a tokenizer built in-test, no model, no downloads."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loraplace.core.config import DataSpec
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.batches import batches, padding_fraction
from loraplace.data.examples import DataError, Example, detect_format, format_example
from loraplace.data.sources import load_examples, split_examples, train_eval_examples
from loraplace.data.tokenize import TokenizedSet, encode_prompt, tokenize
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


# -- tokenization ---------------------------------------------------------------------------------------
def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_labels_mask_the_prompt_and_end_with_eos():
    tok = make_tokenizer()
    ex = [Example("Question: what is two plus two\nAnswer:", " four"), Example("", "the quick brown fox")]
    ts = tokenize(ex, tok, DataSpec(max_length=64))
    p, c = ids(tok, ex[0].prompt), ids(tok, ex[0].completion)
    assert ts.input_ids[0] == p + c + [tok.eos_token_id]
    assert ts.labels[0] == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]
    # text format: every token is a target except the first, which nothing predicts
    assert ts.labels[1] == [IGNORE_INDEX] + ts.input_ids[1][1:]
    assert ts.input_ids[1][-1] == tok.eos_token_id
    assert ts.n_target_tokens == 2 + 4 and ts.lengths == [len(p) + 2, 5]
    assert (ts.dropped, ts.truncated, ts.index) == (0, 0, [0, 1])


def test_bos_only_when_the_tokenizer_adds_it():
    ex = [Example("what is", " four")]
    assert tokenize(ex, make_tokenizer(), DataSpec()).input_ids[0][0] != 3
    tok = make_tokenizer(bos=True)
    ts = tokenize(ex, tok, DataSpec())
    assert ts.input_ids[0] == [3] + ids(tok, "what is") + ids(tok, " four") + [tok.eos_token_id]
    assert ts.labels[0][:3] == [IGNORE_INDEX] * 3


def test_truncation_keeps_the_head_and_drops_examples_without_targets(caplog):
    tok = make_tokenizer()
    ex = [Example("what is", " the quick brown fox"), Example("a b c d e f", " four"), Example("a", " b")]
    ts = tokenize(ex, tok, DataSpec(max_length=4))
    assert ts.index == [0, 2] and ts.dropped == 1 and ts.truncated == 1
    assert ts.input_ids[0] == ids(tok, "what is the quick")  # tail and eos cut
    assert ts.labels[0] == [IGNORE_INDEX, IGNORE_INDEX] + ids(tok, "the quick")
    assert ts.input_ids[1] == ids(tok, "a b") + [tok.eos_token_id]
    assert "dropped 1 of 3" in caplog.text


def test_max_length_too_short_for_every_completion():
    ex = [Example("a b c d e f", " four"), Example("a b c d", " four")]
    with pytest.raises(DataError) as e:
        tokenize(ex, make_tokenizer(), DataSpec(max_length=3))
    assert "max_length=3 truncates away the completion of all 2 examples" in str(e.value)
    assert "max_length >= 5 keeps some, >= 8 keeps all whole" in str(e.value)


def test_chat_template_wraps_the_prompt_as_a_user_message():
    tok = make_tokenizer()
    ts = tokenize([Example("Question: what is two\nAnswer:", " four")], tok, DataSpec(template="chat"))
    prompt = ids(tok, "< user > Question: what is two\nAnswer: <eos> < assistant > ")
    assert ts.input_ids[0] == prompt + ids(tok, "four") + [tok.eos_token_id]
    assert ts.labels[0] == [IGNORE_INDEX] * len(prompt) + ids(tok, "four") + [tok.eos_token_id]
    with pytest.raises(DataError, match="has no chat template; use data.template=plain"):
        tokenize([Example("a", "b")], make_tokenizer(chat=False), DataSpec(template="chat", max_length=9))


@pytest.mark.parametrize("template, bos", [("plain", False), ("plain", True), ("chat", False)])
def test_encode_prompt_matches_the_training_prompt(template, bos):
    tok = make_tokenizer(bos=bos)
    ex = Example("Question: what is two plus two\nAnswer:", " four")
    ts = tokenize([ex], tok, DataSpec(template=template))
    n_prompt = ts.labels[0].index(ids(tok, "four")[0])
    assert encode_prompt(ex, tok, DataSpec(template=template)) == ts.input_ids[0][:n_prompt]


def test_tokenization_is_memoized_per_tokenizer_template_length_and_data():
    tok = make_tokenizer()
    ex = [Example("what is", " four"), Example("a", " b")]
    ts = tokenize(ex, tok, DataSpec(max_length=50))
    assert tokenize(list(ex), make_tokenizer(), DataSpec(max_length=50, eval_size=3)) is ts
    assert tokenize(ex, tok, DataSpec(max_length=51)) is not ts
    assert tokenize(ex, tok, DataSpec(max_length=50, template="chat")) is not ts
    assert tokenize(ex[:1], tok, DataSpec(max_length=50)) is not ts
    other = tokenize(ex, make_tokenizer(extra="zebra"), DataSpec(max_length=50))
    assert other is not ts


# -- batches --------------------------------------------------------------------------------------------
def fake_set(lengths) -> TokenizedSet:
    return TokenizedSet([[i + 1] * n for i, n in enumerate(lengths)], [[IGNORE_INDEX] + [7] * (n - 1) for n in lengths])


def test_batches_pad_right_and_mask_padding():
    ts = fake_set([3, 5, 2])
    (b,) = batches(ts, 4, seed=None, pad_id=0, group_by_length=False)
    assert b["input_ids"].tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2], [3, 3, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert b["labels"][0].tolist() == [IGNORE_INDEX, 7, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert all(t.dtype == torch.long for t in b.values())
    (b,) = batches(ts, 4, seed=None, pad_id=0)  # eval with grouping: longest first, no randomness
    assert b["input_ids"][:, 0].tolist() == [2, 1, 3]


def order(ts, seed, **kw):
    return [b["input_ids"][:, 0].tolist() for b in batches(ts, 8, seed=seed, pad_id=0, **kw)]


@pytest.mark.parametrize("group", [True, False])
def test_batches_are_deterministic_per_seed_and_cover_every_example(group):
    ts = fake_set([(i * 37) % 50 + 1 for i in range(1000)])
    a = order(ts, 0, group_by_length=group)
    assert a == order(ts, 0, group_by_length=group)
    assert a != order(ts, 1, group_by_length=group)
    assert sorted(sum(a, [])) == list(range(1, 1001))
    kept = order(ts, 0, group_by_length=group, drop_last=True)
    assert len(kept) == 125 and all(len(b) == 8 for b in kept)


def test_drop_last_drops_only_the_short_batch():
    ts = fake_set([4] * 20)
    full = order(ts, 3)
    assert sorted(map(len, full)) == [4, 8, 8]
    assert order(ts, 3, drop_last=True) == [b for b in full if len(b) == 8]


def test_batches_can_name_each_rows_example():
    ts = fake_set([(i * 37) % 50 + 1 for i in range(40)])  # example i's tokens are all i + 1
    plain = list(batches(ts, 8, seed=2, pad_id=0))
    named = list(batches(ts, 8, seed=2, pad_id=0, index=True))
    assert all("index" not in b for b in plain)
    for p, b in zip(plain, named, strict=True):
        assert all(torch.equal(p[k], b[k]) for k in p)
        assert (b["index"] + 1).tolist() == b["input_ids"][:, 0].tolist()


def test_padding_fraction_matches_the_batches():
    ts = fake_set([(i * 37) % 50 + 1 for i in range(200)])
    for group in (True, False):
        bs = list(batches(ts, 8, seed=5, pad_id=0, group_by_length=group))
        real = sum(int(b["attention_mask"].sum()) for b in bs)
        slots = sum(b["attention_mask"].numel() for b in bs)
        assert padding_fraction(ts, 8, 5, group) == pytest.approx(1 - real / slots)


@needs_gsm8k
def test_length_grouping_cuts_padding_on_gsm8k_lengths():
    ex = load_examples(DataSpec(source=str(GSM8K / "train.jsonl")))
    lengths = [len(e.prompt + e.completion) // 4 for e in ex]  # about one token per 4 characters
    grouped = padding_fraction(lengths, 8, seed=0)
    shuffled = padding_fraction(lengths, 8, seed=0, group_by_length=False)
    assert shuffled > 0.2 and grouped < 0.05 and grouped < shuffled / 5


# -- conversations ------------------------------------------------------------------------------------
import tiny_models  # noqa: E402  (the ChatML character tokenizer: decoding gives the text back exactly)

CHATML_END = "<|im_end|>"
TALK = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six.\n#### 6"}]


def spans(ts: TokenizedSet, tok, row: int = 0) -> list[str]:
    """The decoded runs of consecutive target tokens of one tokenized example."""
    out, run = [], []
    for t, lab in zip(ts.input_ids[row], ts.labels[row]):
        if lab != IGNORE_INDEX:
            assert lab == t
            run.append(t)
        elif run:
            out, run = out + [tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])


def chat_spec(**kw) -> DataSpec:
    return DataSpec(**{"max_length": 512, **kw})


def test_messages_and_sharegpt_load_as_the_same_conversation(tmp_path):
    (m,) = load(write(tmp_path / "m.jsonl", [{"messages": TALK, "id": 7}]))
    share = [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in TALK]
    (s,) = load(write(tmp_path / "s.jsonl", [{"conversations": share}]))
    assert m == s and m.messages == tuple((t["role"], t["content"]) for t in TALK)
    assert m.answer == "6" and (m.prompt, m.completion) == ("", "")
    assert m.where == f"{tmp_path / 'm.jsonl'}:1"
    # chat fields win over others the row also carries (datasets often add a "prompt" or rendered "text")
    (both,) = load(write(tmp_path / "b.jsonl", [{"messages": TALK, "text": "rendered", "prompt": "p"}]))
    assert both.messages == m.messages
    assert load(write(tmp_path / "p.parquet", [{"messages": TALK}]))[0] == m if _has_pyarrow() else True


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def test_single_turn_loss_is_the_assistant_reply_and_its_end_of_turn():
    tok = tiny_models.chat_tokenizer()
    ex = format_example("messages", {"messages": TALK[:2]}, "x:1")
    ts = tokenize([ex], tok, chat_spec())
    text = tok.decode(ts.input_ids[0])
    assert text == tok.apply_chat_template(list(TALK[:2]), tokenize=False)  # the template's rendering, whole
    assert text.startswith("<|im_start|>system\nYou are tiny.<|im_end|>\n")  # the default system prompt is kept
    assert spans(ts, tok) == ["It is 4." + CHATML_END]  # the newline after <|im_end|> is context
    assert ts.n_target_tokens == len("It is 4.") + 1
    assert tok.eos_token_id in ts.labels[0]  # the model learns to stop


def test_every_assistant_turn_of_a_multi_turn_conversation_is_a_target_and_nothing_else():
    tok = tiny_models.chat_tokenizer()
    rows = [{"messages": [{"role": "system", "content": "Be brief."}] + TALK},
            {"conversations": [{"from": "system", "value": "Count."}, {"from": "human", "value": "one"},
                               {"from": "gpt", "value": "two"}, {"from": "user", "value": "three"},
                               {"from": "assistant", "value": "four"}, {"from": "human", "value": "thanks"}]}]
    exs = [format_example(detect_format("x", r), r, "x") for r in rows]
    ts = tokenize(exs, tok, chat_spec())
    assert spans(ts, tok, 0) == ["It is 4." + CHATML_END, "Six.\n#### 6" + CHATML_END]
    assert spans(ts, tok, 1) == ["two" + CHATML_END, "four" + CHATML_END]  # the trailing user turn is context
    first = tok.decode(ts.input_ids[0])
    assert first.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "You are tiny." not in first
    assert tok.decode(ts.input_ids[1]).endswith("<|im_start|>user\nthanks<|im_end|>\n")
    assert ts.labels[0][0] == IGNORE_INDEX


def test_encode_prompt_of_a_conversation_is_everything_before_its_last_assistant_turn():
    tok = tiny_models.chat_tokenizer()
    ex = format_example("messages", {"messages": TALK}, "x")
    prompt = encode_prompt(ex, tok, chat_spec())
    assert tok.decode(prompt) == tok.apply_chat_template(TALK[:3], tokenize=False, add_generation_prompt=True)
    ts = tokenize([ex], tok, chat_spec())
    assert ts.input_ids[0][: len(prompt)] == prompt
    assert tok.decode(ts.input_ids[0][len(prompt):]).startswith("Six.")
    assert ts.labels[0][len(prompt) - 1] == IGNORE_INDEX and ts.labels[0][len(prompt)] != IGNORE_INDEX


def test_truncation_of_a_conversation_keeps_whole_earlier_turns_and_drops_those_without_targets(caplog):
    tok = tiny_models.chat_tokenizer()
    ex = format_example("messages", {"messages": TALK}, "x")
    full = tokenize([ex], tok, chat_spec())
    second = encode_prompt(ex, tok, chat_spec())  # the last turn starts here
    cut = tokenize([ex, ex], tok, chat_spec(max_length=len(second) + 2))
    assert spans(cut, tok) == ["It is 4." + CHATML_END, "Si"] and cut.truncated == 2
    first_start = next(i for i, t in enumerate(full.labels[0]) if t != IGNORE_INDEX)
    short = format_example("messages", {"messages": TALK[:2]}, "x")
    ts = tokenize([ex, short], tok, chat_spec(max_length=first_start + 1))
    assert ts.dropped == 0 and spans(ts, tok, 0) == ["I"]
    with pytest.raises(DataError, match=f"max_length >= {first_start + 1} keeps some"):
        tokenize([ex, short], tok, chat_spec(max_length=first_start))


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "hi"}], r"m.jsonl:2: the conversation has no assistant turn \(roles user\)"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
     r"m.jsonl:2: messages\[1\]: unknown role 'tool'; expected one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], r"messages\[1\]: empty 'content'"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "y"}],
     r"messages\[0\]: 'content' must be text, got list"),
    ([{"role": "user"}, {"role": "assistant", "content": "y"}], r"messages\[0\]: missing field 'content'"),
    (["hi", "there"], r"messages\[0\]: expected an object with 'role' and 'content', got str"),
    ("hi", r"m.jsonl:2: field 'messages' must be a non-empty list .* got str"),
    ([], r"field 'messages' must be a non-empty list .* got an empty list"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "u"}],
     r"messages\[1\]: the first assistant turn must follow a user turn"),
])
def test_bad_conversations_are_one_line_errors_naming_file_and_line(tmp_path, turns, message):
    rows = [{"messages": TALK}, {"messages": turns}]
    with pytest.raises(DataError, match=message) as e:
        load(write(tmp_path / "m.jsonl", rows))
    assert "\n" not in str(e.value)


def test_sharegpt_roles_and_a_forced_format(tmp_path):
    p = write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}])
    with pytest.raises(DataError, match=r"s.jsonl:1: conversations\[1\]: unknown from 'bot'; expected one of system, "
                                        r"human, user, gpt, assistant"):
        load(p)
    with pytest.raises(DataError, match=r"s.jsonl:1: missing field 'messages' \(format messages"):
        load(p, format="messages")


def test_a_conversation_needs_a_chat_template_and_one_that_renders_prefixes_as_prefixes():
    ex = format_example("messages", {"messages": TALK}, "f.jsonl:3")
    tok = tiny_models.chat_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match=r"f.jsonl:3: a conversation needs a chat template and tokenizer .* has none"):
        tokenize([ex], tok, chat_spec())
    # a template that marks the last turn differently: assistant turns cannot be located by prefixes
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"f.jsonl:3: the chat template of .* renders turn 1 differently"):
        tokenize([ex], tok, chat_spec())
    tok.chat_template = "{% for m in messages %}{% if m.role == 'user' and loop.index0 > 1 %}" \
                        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(DataError, match=r"f.jsonl:3: the chat template of .* cannot render this conversation "
                                        r"\(TemplateError: roles must alternate\)"):
        tokenize([ex], tok, chat_spec())


def test_conversations_memoize_on_their_turns():
    tok = tiny_models.chat_tokenizer()
    a = format_example("messages", {"messages": TALK}, "x")
    b = format_example("messages", {"messages": TALK[:2] + [{"role": "user", "content": "And 3+3?"},
                                                              {"role": "assistant", "content": "Seven."}]}, "x")
    ts = tokenize([a], tok, chat_spec())
    assert tokenize([a], tok, chat_spec()) is ts and tokenize([b], tok, chat_spec()) is not ts


def test_plain_formats_with_the_chat_tokenizer_still_end_with_its_eos():
    tok = tiny_models.chat_tokenizer()
    ts = tokenize([Example("Question: 2+2?\nAnswer:", " 4")], tok, DataSpec(template="chat"))
    assert spans(ts, tok) == ["4" + CHATML_END]


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


@pytest.mark.slow
def test_real_smollm2_template_default_system_prompt_and_loss_spans():
    from loraplace.model.loading import ModelError, load

    try:
        _, tok = load("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"embedded model not available: {e}")
    system = [{"role": "system", "content": "You add numbers."}]
    exs = [format_example("messages", {"messages": m}, "x") for m in (TALK, system + TALK)]
    ts = tokenize(exs, tok, chat_spec())
    for row, messages in enumerate((TALK, system + TALK)):
        assert tok.decode(ts.input_ids[row]) == tok.apply_chat_template(messages, tokenize=False)
        assert spans(ts, tok, row) == ["It is 4.<|im_end|>", "Six.\n#### 6<|im_end|>"]
    assert "named SmolLM" in tok.decode(ts.input_ids[0]) and "named SmolLM" not in tok.decode(ts.input_ids[1])
    assert tok.eos_token == "<|im_end|>"
    prompt = encode_prompt(exs[0], tok, chat_spec())
    assert tok.decode(prompt) == tok.apply_chat_template(TALK[:3], tokenize=False, add_generation_prompt=True)


def test_a_template_without_an_end_of_turn_token_is_warned_about(caplog):
    tok = tiny_models.chat_tokenizer()
    ex = format_example("messages", {"messages": TALK[:2]}, "x")
    tokenize([ex], tok, chat_spec())
    assert "no special token" not in caplog.text
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    ts = tokenize([ex], tok, chat_spec())
    assert spans(ts, tok) == ["It is 4."] and "closes assistant turns with no special token" in caplog.text
