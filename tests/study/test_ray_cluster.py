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
import time
from pathlib import Path

import psutil
import pytest
import tiny_models

import loraplace
from loraplace.core.config import StudyConfig
from loraplace.study.run import run_study
from loraplace.store.db import Store

ray = pytest.importorskip("ray", reason="Ray is not installed (it comes with the [dev] extra)")
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OBJECT_STORE = 80 * 2**20  # bytes per node; the default reserves 30% of RAM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(temp: str) -> set:
    """This test's Ray processes only: those whose command line names this cluster's temp dir
    (GCS, raylets, agents), and their children (the workers)."""
    me = os.getpid()
    procs = {p for p in psutil.process_iter(["cmdline"]) if p.pid != me and temp in " ".join(p.info["cmdline"] or [])}
    for p in list(procs):
        try:
            procs |= set(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return procs


def _stop(temp: str) -> None:
    """Stop this test's nodes only (`ray stop` would stop every Ray instance on the machine)."""
    procs = _cluster_processes(temp)
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
    try:
        for argv in ([exe, "start", "--head", f"--port={port}", "--include-dashboard=false", *node],
                     [exe, "start", f"--address=127.0.0.1:{port}", *node]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        for _ in range(30):  # the second node takes a moment to show up
            status = subprocess.run([exe, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                                    text=True, timeout=120)
            if status.stdout.count(" node_") == 2 and "0.0/2.0 CPU" in status.stdout:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the cluster never showed two nodes with a CPU each:\n{status.stdout}{status.stderr}")
        yield f"127.0.0.1:{port}", env, temp
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


SETTINGS = {"cpus_per_trial": 1, "strategies": ["all_linear", "attention_only", "mlp_only"], "seeds": [0],
            "data": {"limit": 60, "eval_size": 12, "max_length": 96},
            "train": {"steps": 3, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "threads": 1}}


def _cfg(model_dir, out, **over) -> StudyConfig:
    return StudyConfig.from_dict({"model": model_dir, "out": str(out), **SETTINGS, **over})


def _study_on(cluster, model_dir, out: Path, *overrides: str) -> list:
    """`loraplace study executor=ray` in its own process (a driver apart from this test process,
    whose Ray client state an earlier in-process ray.init may have set), then the stored trials."""
    address, env, _ = cluster
    cfg = _cfg(model_dir, out, executor="ray", ray_address=address)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(cfg.to_yaml())
    done = subprocess.run([sys.executable, "-m", "loraplace", "study", str(out / "study.yaml"), *overrides], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with Store.open(out, create=False) as store:
        return store.trials()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    model_dir = tiny_models.save("llama", tmp / "model")
    return model_dir, run_study(_cfg(model_dir, tmp / "study", executor="local"))


def _same_trials(local_records, records, study_dir: Path) -> None:
    records = {r.trial_id: r for r in records}
    assert sorted(records) == sorted(r.trial_id for r in local_records)
    records = [records[r.trial_id] for r in local_records]
    assert all(r.status == "done" for r in records), [(r.strategy, r.status, r.error) for r in records]
    for a, b in zip(local_records, records):
        assert b.metrics["eval_loss"] == pytest.approx(a.metrics["eval_loss"], rel=1e-5)
        assert [l for _, l in b.curve] == pytest.approx([l for _, l in a.curve], rel=1e-5)
        assert (study_dir / b.adapter_path / "adapter_model.safetensors").is_file()  # written by the workers


def test_a_study_across_two_nodes_matches_a_local_run(cluster, local, tmp_path):
    model_dir, local_records = local
    out = tmp_path / "study"
    records = _study_on(cluster, model_dir, out)  # two 1-CPU workers at a time on two 1-CPU nodes: one on each
    _same_trials(local_records, records, out)


class _Killer(threading.Thread):
    """SIGKILLs the first worker of this test's cluster seen running a trial (process title
    ray::_RayWorker.run); never a process of any other Ray instance on the machine."""

    def __init__(self, temp: str):
        super().__init__(daemon=True)
        self.temp, self.killed, self.stop = temp, None, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            for p in _cluster_processes(self.temp):
                try:
                    title = " ".join(p.cmdline())
                except psutil.NoSuchProcess:
                    continue
                if "ray::_RayWorker.run" in title:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        continue
                    self.killed = p.pid
                    return


def _with_a_worker_killed(cluster, model_dir, out, *overrides):
    killer = _Killer(cluster[2])
    killer.start()
    try:
        records = _study_on(cluster, model_dir, out, *overrides)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no worker was seen running a trial"
    return records


def test_a_killed_worker_fails_its_trial_or_is_retried(cluster, local, tmp_path):
    model_dir, local_records = local
    out = tmp_path / "study"
    # No retries: the killed worker's trial is recorded as failed with the reason; the others finish.
    records = _with_a_worker_killed(cluster, model_dir, out, "max_retries=0")
    failed = [r for r in records if r.status == "failed"]
    assert len(failed) == 1 and failed[0].error.startswith("WorkerDied: worker died"), [(r.status, r.error) for r in records]
    assert sum(r.status == "done" for r in records) == 2
    # One retry (the default): rerunning the study tries the failed trial again, a worker dies again
    # mid-trial, and its retry on a new worker gives the numbers of the local run.
    records = _with_a_worker_killed(cluster, model_dir, out)
    _same_trials(local_records, records, out)
