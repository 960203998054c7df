"""Tokenization: prompt masking, BOS and EOS, truncation, chat templates for single prompts, memoization."""

from __future__ import annotations

import pytest

from loraplace.core.config import DataSpec
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.examples import DataError, Example
from loraplace.data.tokenize import encode_prompt, tokenize
from data_toys import make_tokenizer


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
