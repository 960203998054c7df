"""The command line as a user meets it: each command on a tiny local model, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import tiny_models

from loraplace.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models.save("llama", tmp_path_factory.mktemp("tiny-llama"))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_table_and_json(capsys, model_dir):
    rc, out, _ = _run(capsys, "inspect", "--model", model_dir)
    assert rc == 0 and "llama: 2 blocks at model.layers" in out and "mlp.down" in out and "lm_head" in out
    rc, out, _ = _run(capsys, "inspect", "--model", model_dir, "--json")
    data = json.loads(out)
    assert data["n_blocks"] == 2 and {l["role"] for l in data["layers"]} >= {"attn.q", "mlp.gate"}


def test_plan_counts_and_budget(capsys, model_dir):
    rc, out, _ = _run(capsys, "plan", "--model", model_dir, "--strategies", "all_linear,qv_only", "--json", "train.rank=4")
    plans = json.loads(out)
    assert rc == 0 and set(plans) == {"all_linear", "qv_only"}
    qv = plans["qv_only"]
    assert len(qv["modules"]) == 4 and {m["role"] for m in qv["modules"].values()} == {"attn.q", "attn.v"}
    assert qv["trainable_params"] == 2 * 4 * ((48 + 48) + (48 + 16))  # 2 blocks x r4 x (q + v widths)
    rc, out, _ = _run(capsys, "plan", "--model", model_dir, "--strategies", "attention_only", "--budget", "same:all_linear", "train.rank=4")
    assert rc == 0 and "budget-matched to same:all_linear" in out and "attention_only" in out


@pytest.mark.slow
def test_study_status_report_export(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "s"
    argv = ["study", f"model={model_dir}", f"out={out_dir}", "strategies=[all_linear,mlp_only]", "seeds=[0,1]",
            "data.limit=60", "data.eval_size=12", "train.steps=2", "train.batch_size=4", "train.rank=4"]
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0 and "all_linear" in out and "mlp_only" in out and "Recommendation" in out
    rc, out, _ = _run(capsys, "status", str(out_dir))
    assert rc == 0 and out.count("done") >= 4 and "4 done" in out
    rc, out, _ = _run(capsys, "status", str(out_dir), "--csv")
    assert out.splitlines()[0].startswith("trial_id,strategy,seed,phase,lr,status") and len(out.splitlines()) == 5
    rc, out, _ = _run(capsys, "report", str(out_dir))
    assert rc == 0 and (out_dir / "report" / "report.html").is_file()
    rc, out, _ = _run(capsys, "export", str(out_dir), "--strategy", "mlp_only", "--format", "peft")
    cfg = json.loads(out)
    assert rc == 0 and all(".mlp." in name for name in cfg["target_modules"]) and len(cfg["target_modules"]) == 6


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["inspect", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["inspect", "--model", "./missing-dir"], "no such file or directory"),
        (["plan", "--strategies", "nope"], "unknown strategy 'nope'"),
        (["plan", "train.rank=0"], "train.rank: must be > 0"),
        (["plan", "train.lr=fast"], "train.lr: expected a number"),
        (["plan", "train.lr=nan"], "train.lr: expected a finite number, got 'nan'"),
        (["plan", "train.alpha=.inf"], "train.alpha: expected a finite number"),
        (["plan", "train.warmup=nan"], "train.warmup: expected a finite number"),
        (["plan", "train.weight_decay=-inf"], "train.weight_decay: expected a finite number"),
        (["plan", "threshold=nan"], "threshold: expected a finite number"),
        (["plan", "tune.lr=[1e-3,1e-2]", "tune.eval_limit=0"], "tune.eval_limit: must be > 0"),
        (["study", "strategies=[all_linear]", "baseline=attention_only"],
         "baseline: 'attention_only' is not among strategies ['all_linear']"),
        (["study", "data.source=/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
        (["status", "/nonexistent/study"], "no study database"),
        (["study", "track=wandb"], "track=wandb needs Weights & Biases: pip install wandb"),
        (["study", "track=neptune"], "track: 'neptune' is not one of mlflow, wandb"),
        (["export", "/nonexistent/study", "--strategy", "x", "--format", "peft"], "no study database"),
        (["study", "train.device=cuda"], "train.device=cuda: "),
        (["study", "train.device=cuda:7"], "train.device=cuda:7: "),
        (["probe", "train.device=cuda"], "train.device=cuda: "),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, argv, needle, model_dir):
    if "track=wandb" in argv and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: track=wandb works here")
    if any(a.startswith("train.device=cuda") for a in argv) and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: train.device=cuda works here")
    argv = [a if a != "MODEL" else model_dir for a in argv]
    if argv[0] in ("plan", "study", "probe") and not any(a.startswith("--model") or a.startswith("model=") for a in argv):
        argv += ["--model", model_dir] if argv[0] == "plan" else [f"model={model_dir}"]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    lines = [l for l in err.splitlines() if l.startswith("loraplace: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_bad_dataset_lines_and_unwritable_output(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?"\n')
    rc, _, err = _run(capsys, "study", f"model={model_dir}", f"data.source={bad}", f"out={tmp_path / 'o'}")
    assert rc == 2 and "bad.jsonl:2" in err
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?"}\n')
    rc, _, err = _run(capsys, "study", f"model={model_dir}", f"data.source={missing}", f"out={tmp_path / 'o'}")
    assert rc == 2 and "missing.jsonl:2" in err and "answer" in err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = _run(capsys, "study", f"model={model_dir}", f"out={blocker / 'sub'}")
    assert rc == 2 and "cannot use study directory" in err and "Traceback" not in err


@pytest.mark.slow
def test_report_writes_almost_nothing_to_stderr(tmp_path):
    """Only loraplace's own messages at INFO: matplotlib's PDF backend subsets fonts through fontTools, which logs
    some 330 lines per report at INFO. A fresh process, since pytest's own log handlers hide what a user sees."""
    from fake_study import make_study

    study = make_study(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-m", "loraplace", "report", str(study), "--format", "png,pdf"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (study / "report" / "pareto.pdf").is_file()  # the fonts were subset
    assert len(proc.stderr.splitlines()) <= 3, proc.stderr[:2000]
    assert "Recommendation:" in proc.stdout


def test_status_shows_which_process_holds_a_running_trial(capsys, tmp_path):
    import os

    from loraplace.store.claims import HOST, claim
    from loraplace.store.db import Store

    with Store.open(tmp_path) as store:
        store.add_pending("held", "all_linear", 0, {})
        store.add_pending("waiting", "mlp_only", 0, {})
        assert claim(store, "held")
    rc, out, _ = _run(capsys, "status", str(tmp_path))
    line = next(l for l in out.splitlines() if l.startswith("all_linear"))
    assert rc == 0 and "running" in line and f"{os.getpid()}@{HOST}, beat " in line and "(gone)" not in line
    assert "1 running, 1 pending" in out and "gone" not in out


def test_a_corrupt_gguf_is_one_line_and_leaves_the_cache_empty(capsys, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 16)  # not a GGUF file at all
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and a version, then nothing
    from loraplace.model.loading import ModelError, load

    for path in (garbage, truncated):
        rc, _, err = _run(capsys, "inspect", "--model", str(path))  # reads only the config: one line
        assert rc == 2 and f"model {str(path)!r}" in err and len(err.strip().splitlines()) == 1
        with caplog.at_level("INFO", logger="loraplace"), pytest.raises(ModelError, match="could not be loaded"):
            load(str(path))  # the training path dequantizes (and would cache) the weights
        assert not any("cached" in r.getMessage() for r in caplog.records)  # no claim of a cache that is not there
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))


@pytest.fixture
def no_tokenizer_no_weights(monkeypatch):
    """inspect and plan must read neither a tokenizer nor weights: both loaders fail loudly if called."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("inspect/plan loaded a tokenizer or weights")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("arch", tiny_models.ARCH_NAMES)
def test_config_only_dir_inspect_and_plan(capsys, tmp_path, arch, no_tokenizer_no_weights):
    d = tiny_models.save_config(arch, tmp_path / arch)  # config.json only: no tokenizer files, no weights
    rc, out, err = _run(capsys, "inspect", "--model", d)
    assert rc == 0 and "2 blocks at" in out and "mlp.down" in out, err
    rc, out, err = _run(capsys, "plan", "--model", d, "--strategies", "all_linear,attention_only")
    assert rc == 0 and "est. peak mem" in out and "GFLOP/step" in out and "activations" in out, err


def test_plan_json_carries_the_estimate(capsys, tmp_path, no_tokenizer_no_weights):
    d = tiny_models.save_config("llama", tmp_path / "llama")
    rc, out, _ = _run(capsys, "plan", "--model", d, "--json", "--strategies", "all_linear,top_half",
                      "train.batch_size=4", "data.max_length=64", "train.rank=4")
    plans = json.loads(out)
    assert rc == 0
    for p in plans.values():
        est = p["estimate"]
        assert est["tokens_per_step"] == 4 * 64 and est["peak_bytes"] == sum(est["terms"].values())
        # a CPU process also holds what glibc keeps of a step's freed blocks: more than the tensors, never less
        assert est["peak_bytes"] < est["cpu_rss_bytes"] < est["peak_bytes"] + est["peak_bytes"] - est["terms"]["weights"]
        assert est["terms"]["adamw"] == 8 * p["trainable_params"] and est["terms"]["weights"] == 4 * p["base_params"]
    assert plans["top_half"]["estimate"]["terms"]["activations"] < plans["all_linear"]["estimate"]["terms"]["activations"]


@pytest.mark.parametrize("arch", tiny_models.MOE_NAMES)
def test_moe_inspect_and_plan_place_the_experts(capsys, tmp_path, arch, no_tokenizer_no_weights):
    d = tiny_models.save_config(arch, tmp_path / arch)
    rc, out, _ = _run(capsys, "inspect", "--model", d)
    assert rc == 0 and "attn.q" in out and "mlp.experts.gate_up" in out and "mlp.experts.down" in out
    apart = out.split("not adaptable")[1]
    assert "moe.router" in apart and "mlp.experts" not in apart  # the router alone is left out, with its count
    rc, out, _ = _run(capsys, "plan", "--model", d)  # the default strategies, mlp_only among them
    assert rc == 0 and "skipped" not in out and "mlp_only" in out and "routed-expert activations" in out
    rc, out, _ = _run(capsys, "plan", "--model", d, "--strategies", "mlp_only", "--json")
    roles = {m["role"] for m in json.loads(out)["mlp_only"]["modules"].values()}
    assert rc == 0 and {"mlp.experts.gate_up", "mlp.experts.down"} <= roles  # Qwen2-MoE: its shared expert's too


def test_plan_on_a_70b_config(capsys, tmp_path, no_tokenizer_no_weights):
    from tiny_models import LLAMA_70B

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))  # 140 GB of weights never needed
    rc, out, _ = _run(capsys, "plan", "--model", str(tmp_path), "--json", "--strategies", "all_linear,qv_only",
                      "train.dtype=bfloat16", "train.batch_size=1", "data.max_length=4096")
    plans = json.loads(out)
    assert rc == 0 and 70.5e9 < plans["all_linear"]["base_params"] < 70.6e9
    est = plans["all_linear"]["estimate"]
    assert est["terms"]["weights"] == 2 * plans["all_linear"]["base_params"] and est["tokens_per_step"] == 4096
    assert plans["all_linear"]["trainable_params"] == 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024)
                                                               + 2 * (8192 + 28672) + (28672 + 8192))
