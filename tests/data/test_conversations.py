"""Conversations (messages, sharegpt): loading, loss on every assistant turn and its end of turn, prompts, truncation."""

from __future__ import annotations

import pytest
import tiny_models  # the ChatML character tokenizer: decoding gives the text back exactly

from loraplace.core.config import DataSpec
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.examples import DataError, Example, detect_format, format_example
from loraplace.data.tokenize import TokenizedSet, encode_prompt, tokenize
from data_toys import load, write


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
