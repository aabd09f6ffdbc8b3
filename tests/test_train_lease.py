"""One run per training folder: ``train`` and ``pretrain`` hold the lease of ``--out`` (galaxalign_batch.lease).

Before this, two ``train --out DIR`` runs at once both exited 0 into one folder: ``metrics.csv`` had every
epoch twice (interleaved rows of two runs), the checkpoints and ``model.safetensors`` were whichever run
wrote last, and a second run started later resumed from the first's checkpoints while they were written.
These tests run the failure as it happens: two processes, a SIGKILLed holder, a forced takeover.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_symbol_labelled

from galaxalign_batch import lease
from galaxalign_batch.cli import main
from galaxalign_batch.model import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: one torch thread per module

STAMP = 48


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_symbol_labelled(tmp_path_factory.mktemp("sim"), {"train": 4, "val": 1, "test": 1}, STAMP)


def _train_args(data, out, epochs: int) -> list[str]:
    return ["--no-progress", "train", "--data", str(data), "--out", str(out), "--mode", "image-text",
            "--epochs", str(epochs), "--batch-size", "8", "--max-steps-per-epoch", "2", "--angular-size", "12",
            "--threads", "1"]


def _spawn_train(data, out, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "galaxalign_batch", *_train_args(data, out, epochs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.time() - t0 < timeout, "timed out waiting for the first run"
        time.sleep(0.1)


def _epochs(out: Path) -> list[int]:
    with open(out / "metrics.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("epoch_*") if ckpt.is_complete(p)) if root.is_dir() else []


def test_a_second_train_into_one_folder_refuses_and_the_first_is_untouched(labelled, tmp_path, caplog):
    out = tmp_path / "run"
    first = _spawn_train(labelled, out, epochs=6)
    try:
        _wait_for(lambda: os.path.exists(lease.lock_path(out)), first)
        with caplog.at_level("ERROR"):
            assert main(_train_args(labelled, out, epochs=6)) == 1
        msg = " ".join(r.getMessage() for r in caplog.records)
        assert "is being written by another run" in msg and f"pid {first.pid}" in msg and "--force-unlock" in msg
        # the spelling does not matter: another path to the same folder names the same lease
        assert main(_train_args(labelled, Path(str(out) + "/"), epochs=6)) == 1
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _epochs(out) == [1, 2, 3, 4, 5, 6]  # one run's history, each epoch once
    assert not os.path.exists(lease.lock_path(out))  # a run that ends gives its lease back


def test_a_killed_run_leaves_a_stale_lease_that_the_rerun_takes_over_and_resumes(labelled, tmp_path, caplog):
    out = tmp_path / "run"
    first = _spawn_train(labelled, out, epochs=8)
    try:
        _wait_for(lambda: len(_checkpoints(out)) >= 1, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert os.path.exists(lease.lock_path(out))  # killed: its lease stays, naming a dead pid
    leftover = out / ".model.0123456789ab.partial.safetensors"  # as if killed while writing its model
    leftover.write_bytes(b"half")
    with caplog.at_level("WARNING"):
        assert main(_train_args(labelled, out, epochs=8)) == 0  # the same command again
    assert any("taking over a stale lock" in r.getMessage() and "process is gone" in r.getMessage()
               for r in caplog.records)
    assert _epochs(out) == list(range(1, 9))  # resumed after the last whole epoch, none twice
    assert not os.path.exists(lease.lock_path(out))
    assert not leftover.exists()  # the rerun holds the folder's lease: the dead run's temporaries go


def test_force_unlock_takes_the_folder_and_the_old_run_stops_before_it_writes_again(labelled, tmp_path,
                                                                                      monkeypatch, caplog):
    """Another run takes the lease (``--force-unlock`` on another node) during epoch 3: this run raises
    before it writes that epoch's metrics row or checkpoint, and leaves the new holder's lease alone."""
    from galaxalign_batch.model import train as train_mod

    out = tmp_path / "run"
    real = train_mod._train_epoch

    def epoch_then_taken(cfg, ctx, model, optimizer, scheduler, scaler, stage, train, prompts, epoch, steps):
        loss = real(cfg, ctx, model, optimizer, scheduler, scaler, stage, train, prompts, epoch, steps)
        if epoch == 2:  # the third epoch (0-based): its lease goes to another run while it computes
            os.unlink(lease.lock_path(out))
            _fake_live_lease(out)
        return loss

    monkeypatch.setattr(train_mod, "_train_epoch", epoch_then_taken)
    with caplog.at_level("ERROR"):
        assert main(_train_args(labelled, out, epochs=5)) == 1
    assert any("this run lost its lock (now held by host node-" in r.getMessage() for r in caplog.records)
    assert _epochs(out) == [1, 2] and _checkpoints(out) == ["epoch_0001", "epoch_0002"]
    assert not (out / "model.safetensors").exists()
    assert lease.read_lease(lease.lock_path(out))["token"] == "other"  # the new holder's lease stands


def _fake_live_lease(target) -> None:
    """A lease held by a run on another node whose heartbeat is fresh (it looks alive)."""
    path = lease.lock_path(target)
    with open(path, "w") as f:
        json.dump({"host": "node-" + socket.gethostname(), "pid": 4242, "started": "then", "token": "other",
                   "command": "galaxalign-batch train ..."}, f)


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_refused_run_changes_nothing_in_the_folder(command, labelled, tmp_path, caplog):
    """``--no-resume`` deletes the folder's checkpoints: never under another live run."""
    out = tmp_path / "run"
    (out / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (out / "metrics.csv").write_text("epoch\n1\n")
    (out / ".model.0123456789ab.partial.safetensors").write_bytes(b"half")  # the live run's, being written
    _fake_live_lease(out)
    args = (_train_args(labelled, out, epochs=1) if command == "train"
            else ["--no-progress", "pretrain", "--tiles", str(tmp_path / "no-such-tiles"), "--out", str(out)])
    with caplog.at_level("ERROR"):
        assert main(args + ["--no-resume"]) == 1
    assert any("is being written by another run: host node-" in r.getMessage() for r in caplog.records)
    assert (out / "checkpoints" / "epoch_0001").is_dir() and (out / "metrics.csv").read_text() == "epoch\n1\n"
    assert sorted(p.name for p in out.iterdir()) == [".model.0123456789ab.partial.safetensors", "checkpoints",
                                                     "metrics.csv"]


def test_a_killed_ray_train_workers_staging_folder_is_removed_by_the_next_worker(tmp_path, monkeypatch):
    """A Ray Train worker stages each checkpoint in a temporary folder it removes when it ends; a killed worker
    (the killed-worker test, the OOM killer) cannot, and left one folder in /tmp per kill (eight after a day of
    CI runs). The next worker on the machine removes those of processes that are gone, and no other."""
    import tempfile

    from galaxalign_batch.model.launch import STAGING_PREFIX, checkpoint_staging

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{STAGING_PREFIX}{gone.pid}-abc123"
    (dead / "epoch_0003").mkdir(parents=True)
    (dead / "epoch_0003" / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f"{STAGING_PREFIX}{os.getppid()}-def456"  # another worker, still running
    old_style = tmp_path / f"{STAGING_PREFIX}q1w2e3r4"  # the earlier name, without a process id: not ours to judge
    other = tmp_path / "something-else-1"
    for d in (alive, old_style, other):
        d.mkdir()
    with checkpoint_staging() as staging:
        assert Path(staging).name.startswith(f"{STAGING_PREFIX}{os.getpid()}-") and Path(staging).is_dir()
        assert not dead.exists() and alive.is_dir() and old_style.is_dir() and other.is_dir()
    assert not Path(staging).exists()
