"""A study on a two-node Ray cluster (a head and a second node, each its own `ray start` process
with one CPU, on this machine) gives the same trials as a local run; a worker killed mid-trial is
retried (max_retries) or recorded as failed with the reason, and the study finishes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest
import tiny_models

import loraplace
from loraplace.config import StudyConfig
from loraplace.study import run_study

ray = pytest.importorskip("ray", reason="Ray is not installed (it comes with the [dev] extra)")
pytestmark = pytest.mark.cluster

OBJECT_STORE = 80 * 2**20  # bytes per node; the default reserves 30% of RAM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(temp: str) -> None:
    """Stop this test's nodes only (`ray stop` would stop every Ray instance on the machine): the
    processes whose command line names this cluster's temp dir, and their children."""
    me = os.getpid()
    procs = {p for p in psutil.process_iter(["cmdline"]) if p.pid != me and temp in " ".join(p.info["cmdline"] or [])}
    for p in list(procs):
        try:
            procs |= set(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=30)


@pytest.fixture(scope="module")
def cluster():
    exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(exe).exists():
        pytest.skip("the `ray` command is not on PATH")
    temp = tempfile.mkdtemp(prefix="lpray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    src = str(Path(loraplace.__file__).resolve().parents[1])  # workers import this checkout's loraplace
    # A throwaway cluster on this machine: no token auth (a token in ~/.ray would otherwise switch it on).
    env_over = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **env_over, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    node = ["--num-cpus=1", f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats"]
    saved = {k: os.environ.get(k) for k in env_over}
    try:
        for argv in ([exe, "start", "--head", f"--port={port}", "--include-dashboard=false", *node],
                     [exe, "start", f"--address=127.0.0.1:{port}", *node]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        os.environ.update(env_over)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _cfg(model_dir, out, **over) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": model_dir, "out": str(out), "cpus_per_trial": 1,
        "strategies": ["all_linear", "attention_only", "mlp_only"], "seeds": [0],
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 3, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "threads": 1},
        **over,
    })


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    model_dir = tiny_models.save("llama", tmp / "model")
    return model_dir, run_study(_cfg(model_dir, tmp / "study", executor="local"))


def _same_trials(local_records, records, study_dir: Path) -> None:
    assert [r.trial_id for r in records] == [r.trial_id for r in local_records]
    assert all(r.status == "done" for r in records), [(r.strategy, r.status, r.error) for r in records]
    for a, b in zip(local_records, records):
        assert b.metrics["eval_loss"] == pytest.approx(a.metrics["eval_loss"], rel=1e-5)
        assert [l for _, l in b.curve] == pytest.approx([l for _, l in a.curve], rel=1e-5)
        assert (study_dir / b.adapter_path / "adapter_model.safetensors").is_file()  # written by the workers


def test_a_study_across_two_nodes_matches_a_local_run(cluster, local, tmp_path):
    model_dir, local_records = local
    out = tmp_path / "study"
    records = run_study(_cfg(model_dir, out, executor="ray", ray_address=cluster))
    # Two 1-CPU workers at a time on two 1-CPU nodes: one on each node.
    assert sum(n["Alive"] for n in ray.nodes()) == 2 and ray.cluster_resources()["CPU"] == 2
    _same_trials(local_records, records, out)


class _Killer(threading.Thread):
    """SIGKILLs the first Ray worker process seen running a trial (process title ray::_RayWorker.run)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.killed, self.stop = None, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            for p in psutil.process_iter(["cmdline"]):
                if "ray::_RayWorker.run" in " ".join(p.info["cmdline"] or []):
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        continue
                    self.killed = p.pid
                    return


def _with_a_worker_killed(cfg):
    killer = _Killer()
    killer.start()
    try:
        records = run_study(cfg)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no worker was seen running a trial"
    return records


def test_a_killed_worker_fails_its_trial_or_is_retried(cluster, local, tmp_path):
    model_dir, local_records = local
    out = tmp_path / "study"
    # No retries: the killed worker's trial is recorded as failed with the reason; the others finish.
    records = _with_a_worker_killed(_cfg(model_dir, out, executor="ray", ray_address=cluster, max_retries=0))
    failed = [r for r in records if r.status == "failed"]
    assert len(failed) == 1 and failed[0].error.startswith("WorkerDied: worker died"), [(r.status, r.error) for r in records]
    assert sum(r.status == "done" for r in records) == 2
    # One retry (the default): rerunning the study tries the failed trial again, a worker dies again
    # mid-trial, and its retry on a new worker gives the numbers of the local run.
    records = _with_a_worker_killed(_cfg(model_dir, out, executor="ray", ray_address=cluster))
    _same_trials(local_records, records, out)
