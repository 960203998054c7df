"""Checkable answers: parsing, matching, the fixed accuracy examples and batched greedy generation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build

from loraplace.core.config import DataSpec, EvalSpec
from loraplace.data.answers import accuracy_examples, answer_matches, final_answer, final_line_stop, final_number
from loraplace.data.examples import Example
from loraplace.data.tokenize import encode_prompt
from loraplace.train.generate import answer_accuracy, generate_greedy

PAD = 0


def test_answer_matching():

    assert final_number("so 3 + 4 = 7.\n#### 1,080") == "1080"
    assert final_number("It is 12 then 18.0") == "18"
    assert answer_matches("The answer is 18.", "18") and not answer_matches("17", "18")
    assert not answer_matches("no number here", "18")
    assert answer_matches(" Yes.\nmore", "Yes") and not answer_matches("No", "Yes")

    assert final_answer("so 2 + 2 = 4\n#### 1,080") == "1080" and final_answer(" Paris ") == "Paris"


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, width


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_greedy_generation_matches_hf_generate_and_drops_finished_rows(arch):
    model = build(arch).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    ids, mask, width = _left_padded(prompts)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None)[:, width:].tolist()
    stop_tok = ref[0][1]  # row 0 stops after 2 tokens; others when (if) they produce the same token

    def cut(row):
        return row[: row.index(stop_tok) + 1] if stop_tok in row else row

    widths = []  # batch size of every forward call
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True)
    got = generate_greedy(model, prompts, 12, PAD, set(), stop=lambda new: new[-1] == stop_tok)
    hook.remove()
    assert got == [cut(r) for r in ref]
    assert widths[0] == 4 and widths[2] < 4  # row 0 left the batch after its second token
    assert len(widths) == max(len(r) for r in got)  # one prefill + one call per further token, no more
    # one stop function per prompt: only row 0 watches for the token
    first_only = generate_greedy(model, prompts, 12, PAD, set(), stop=[lambda new: new[-1] == stop_tok, None, None, None])
    assert first_only == [cut(ref[0])] + ref[1:]
    # an end-of-turn id ends a row and is not part of the answer
    eos_got = generate_greedy(model, prompts, 12, PAD, {stop_tok})
    assert eos_got == [r[: r.index(stop_tok)] if stop_tok in r else r for r in ref]


def test_final_line_stop_waits_for_the_end_of_the_answer_line():
    class Chars:  # a tokenizer whose ids are character codes
        def decode(self, ids, **kw):
            return "".join(map(chr, ids))

    stop = final_line_stop(Chars())
    ids = []
    stopped_at = None
    for i, ch in enumerate("3 + 4 = 7.\nSo 7 apples.\n#### 1,080\nQuestion: next"):
        ids.append(ord(ch))
        if stop(ids):
            stopped_at = i
            break
    assert Chars().decode(ids) == "3 + 4 = 7.\nSo 7 apples.\n#### 1,080\n" and stopped_at is not None
    assert not stop([ord(c) for c in "#### \n"])  # no number on the line yet
    assert final_line_stop(Chars(), "18")([ord(c) for c in "So 18.\n"]) is False  # numeric: wait for '####'
    text_stop = final_line_stop(Chars(), "readability beautiful")  # compared on its first line: stop there
    assert not text_stop([ord(c) for c in " \n"]) and text_stop([ord(c) for c in " \nreadability beautiful\n"])


def test_accuracy_examples_are_the_first_with_an_answer_and_answer_accuracy_counts_them():
    from tiny_models import tokenizer

    pool = [Example("Question: a\nAnswer:", " 1", "1"), Example("x", "y"), Example("Question: b\nAnswer:", " 2", "2"),
            Example("Question: c\nAnswer:", " 3", "3")]
    assert accuracy_examples(pool, 2) == [pool[0], pool[2]] and accuracy_examples(pool, 9) == [pool[0], pool[2], pool[3]]
    model, tok, scored = build("llama"), tokenizer(), accuracy_examples(pool, 9)
    # the answers the model gives one example at a time; the first reference is made right on purpose (its own
    # generation), the second wrong (a text no 3-token generation equals), the third is what it is
    singles = [tok.decode(generate_greedy(model, [encode_prompt(e, tok, DataSpec())], 3, PAD, {2})[0],
                          skip_special_tokens=True) for e in scored]
    scored[0] = Example(scored[0].prompt, "", singles[0])
    scored[1] = Example(scored[1].prompt, "", "not what a tiny model writes")
    assert answer_matches(singles[0], scored[0].answer) and not answer_matches(singles[1], scored[1].answer)
    expected = (1 + answer_matches(singles[2], scored[2].answer)) / 3
    for bs in (1, 2, 3):  # batched, length-sorted generation scores the same
        prompts = [encode_prompt(e, tok, DataSpec()) for e in scored]
        res = answer_accuracy(model, tok, prompts, [e.answer for e in scored], EvalSpec(batch_size=bs, max_new_tokens=3))
        assert res == {"accuracy": pytest.approx(expected), "accuracy_n": 3}
