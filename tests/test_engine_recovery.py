"""Crash recovery: a killed driver, and a killed worker node of a two-node Ray cluster on loopback.

Both end, after the run or its re-run, with every source exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from galaxalign_batch.store import open_store, store_exists  # noqa: E402

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "galaxalign_batch", "--no-progress", "--log-level", "WARNING"]
ENV = dict(os.environ, GALAXALIGN_PROGRESS="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def many_tiles(tmp_path_factory, cutouts_dir) -> Path:
    """12 cube tiles (copies of three real cubes under distinct names)."""
    d = tmp_path_factory.mktemp("many")
    for i in range(4):
        for name in ["example_a", "example_b", "temp_small"]:
            shutil.copy(cutouts_dir / f"{name}.fits", d / f"{name}_{i}.fits")
    return d


def _embed(tiles: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = CLI + ["embed", "--tiles", str(tiles), "--out", str(out), "--model", "tiny", "--commit-rows", "1",
                 "--batch-size", "32", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _committed_rows(out: Path) -> int:
    if not store_exists(out):
        return 0
    try:
        return open_store(out).n_rows
    except Exception:
        return 0


def _check_exactly_once(out: Path, n_tiles: int) -> None:
    store = open_store(out)
    ids = store.read("object_id")
    assert len(set(ids)) == len(ids) == store.n_rows
    assert len(store.completed_tiles()) == n_tiles
    t = store.tile_table()
    done = t["status"] == 1
    # the committed row ranges of done tiles tile [0, n_rows) without gaps or overlaps
    starts, counts = t["row_start"][done], t["row_count"][done]
    order = np.argsort(starts)
    assert starts[order][0] == 0
    assert np.array_equal(starts[order][1:], (starts + counts)[order][:-1])
    assert (starts + counts).max() == store.n_rows
    tiles = store.read("tile")
    for name, s, c in zip(t["name"][done], starts, counts):
        assert (tiles[s:s + c] == name).all()


def test_killed_driver_then_rerun_gives_every_source_once(many_tiles, tmp_path):
    out = tmp_path / "s.zarr"
    proc = _embed(many_tiles, out, "--cpu-workers", "2", start_new_session=True)
    deadline = time.time() + 240
    while _committed_rows(out) == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    partial = open_store(out)
    assert 0 < len(partial.completed_tiles()) < 12
    rerun = _embed(many_tiles, out, "--cpu-workers", "2")
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log
    assert "already done" in log
    _check_exactly_once(out, 12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_survives_a_killed_worker_node(many_tiles, tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    env = dict(ENV)
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    worker = None
    try:
        worker = subprocess.Popen([ray_bin, "start", f"--address={addr}", "--node-ip-address=127.0.0.1",
                                   "--num-cpus=1", "--block", "--disable-usage-stats"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import ray

        deadline = time.time() + 90
        while time.time() < deadline:
            nodes = subprocess.run([sys.executable, "-c",
                                    f"import ray; ray.init(address='{addr}', log_to_driver=False); "
                                    "print(sum(n['Alive'] for n in ray.nodes()))"],
                                   env=env, capture_output=True, text=True).stdout.strip().splitlines()
            if nodes and nodes[-1] == "2":
                break
            time.sleep(1)
        else:
            pytest.fail("the worker node did not join")
        out = tmp_path / "s.zarr"
        proc = _embed(many_tiles, out, "--address", addr)
        deadline = time.time() + 240
        while _committed_rows(out) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(worker.pid, signal.SIGKILL)  # the whole worker node: raylet, workers, maybe the actor
        worker.wait()
        log = proc.communicate(timeout=300)[0]
        if proc.returncode != 0:  # tiles lost with the node are not recorded: the re-run does them
            assert "LOST" in log or "lost" in log, log
            rerun = _embed(many_tiles, out, "--address", addr)
            log = rerun.communicate(timeout=300)[0]
            assert rerun.returncode == 0, log
        _check_exactly_once(out, 12)
        del ray
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=60)
