"""A study on conversational data with a separate, fixed eval file, on a tiny model (no downloads)."""

from __future__ import annotations

import json

import tiny_models

from loraplace.core.config import StudyConfig
from loraplace.model.anatomy import analyze
from loraplace.study import plan as P
from loraplace.study import run as S
from loraplace.store.db import Store


def _conversation(i: int, system: bool = False) -> dict:
    turns = [{"role": "user", "content": f"add {i} and 1"}, {"role": "assistant", "content": f"{i + 1}"}]
    if i % 3 == 0:  # some multi-turn
        turns += [{"role": "user", "content": "and 2 more?"}, {"role": "assistant", "content": f"#### {i + 3}"}]
    return {"messages": ([{"role": "system", "content": "Add."}] if system else []) + turns}


def _files(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(_conversation(i, system=i % 2 == 0)) + "\n" for i in range(40)))
    test.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(100, 110)))
    return train, test


def _cfg(tmp_path, train, test, **data) -> StudyConfig:
    return StudyConfig.from_dict({
        "out": str(tmp_path / "study"), "strategies": ["all_linear", "attention_only"], "seeds": [0],
        "data": {"source": str(train), "eval_source": str(test), "max_length": 128, **data},
        "train": {"steps": 2, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2},
        "eval": {"batch_size": 8, "accuracy": True, "accuracy_limit": 4, "max_new_tokens": 4},
    })


def test_a_study_trains_on_messages_and_evaluates_on_the_fixed_eval_file(tmp_path):
    train, test = _files(tmp_path)
    cfg = _cfg(tmp_path, train, test)
    records = S.run_study(cfg, (tiny_models.build("llama"), tiny_models.chat_tokenizer()))
    assert [(r.strategy, r.status) for r in records] == [("all_linear", "done"), ("attention_only", "done")]
    # accuracy is generated from each conversation's prompt (everything before its last assistant turn): the saved
    # adapter, loaded anew, scores the same on the same 4 examples
    from peft import PeftModel

    from loraplace.study.workspace import Workspace

    ws = Workspace.build(cfg, (tiny_models.build("llama"), tiny_models.chat_tokenizer()))
    assert [e.answer for e in ws.accuracy_examples] == ["101", "102", "105", "104"]  # "#### 105": the number
    for r in records:
        loaded = PeftModel.from_pretrained(tiny_models.build("llama"), tmp_path / "study" / r.adapter_path)
        assert ws.accuracy(loaded) == {"accuracy": r.metrics["accuracy"], "accuracy_n": 4}
    with Store.open(cfg.out, create=False) as store:
        data, zero = store.get_meta("data"), store.get_meta("zero_shot")
    # every example is kept; the eval targets are the assistant replies plus one <|im_end|> per reply
    replies = [t["content"] for i in range(100, 110) for t in _conversation(i)["messages"] if t["role"] == "assistant"]
    assert data == {"source": str(train), "eval_source": str(test), "train_examples": 40, "eval_examples": 10,
                    "eval_tokens": sum(len(r) + 1 for r in replies), "dropped": 0, "selection_examples": 0}
    assert zero["eval_tokens"] == data["eval_tokens"]

    # another eval set is another study: new trial ids and a new zero-shot loss
    fewer = _cfg(tmp_path, train, test, eval_limit=5)
    anat = analyze(tiny_models.build("llama"))
    ids = [{t.trial_id for t in P.plan_trials(c, P.resolve_placements(c, anat))}
           for c in (cfg, fewer, _cfg(tmp_path, train, train))]
    assert not ids[0] & ids[1] and not ids[0] & ids[2]
    S.run_study(StudyConfig.from_dict({**fewer.to_dict(), "strategies": ["all_linear"]}),
                (tiny_models.build("llama"), tiny_models.chat_tokenizer()))
    with Store.open(cfg.out, create=False) as store:
        assert store.get_meta("data")["eval_examples"] == 5
        assert store.get_meta("zero_shot")["key"] != zero["key"]
        assert store.get_meta("zero_shot")["eval_tokens"] < zero["eval_tokens"]
