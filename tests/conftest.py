"""Shared pytest fixtures. Tests read only tests/data/ or data they make."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("GALAXALIGN_PROGRESS", "0")

DATA = Path(__file__).parent / "data"
CUTOUTS = DATA / "decals_cutouts"


@pytest.fixture(scope="session")
def cutouts_dir() -> Path:
    return CUTOUTS


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module: on a shared 2-core machine OpenMP spinning makes 2 threads slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def simulated_sky_store(tmp: Path, seed: int) -> Path:
    """One simulated 512-px brick (real tiles to re-make cutouts from) embedded in this process with
    the tiny model into ``tmp/sky.zarr`` (~175 rows), as `embed` would write it."""
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.encoder import load_encoder
    from galaxalign_batch.engine.prepare import prepare_tile
    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.store import EmbeddingStore

    simulate_survey(tmp / "sky", bricks=1, size=512, seed=seed, density=8000, stars=100, no_coverage=0)
    enc = load_encoder("tiny")
    info = enc.describe()
    store = EmbeddingStore.create(tmp / "sky.zarr", info["dim"], attrs={
        "model": info["identity"], "vocabulary": info["vocabulary"], "cutout_spec": info["cutout_spec"],
        "survey_roots": [str(tmp / "sky")]})
    for ref in resolve_tiles([str(tmp / "sky")]):
        p = prepare_tile(ref, enc.spec)
        store.commit([(ref.name, dict(p.columns, embedding=enc.encode(p.pixels)), "")])
    store.finalize()
    return tmp / "sky.zarr"


def write_symbol_labelled(root: Path, counts: dict[str, int], stamp: int = 48, seed: int = 0) -> Path:
    """A small labelled set in the simulator's layout under ``root/labelled``: each class's symbol painted
    as g, r, z flux (0.3, 0.6, 1 x) plus noise, ``counts[split]`` stamps per class. Returns ``root``."""
    import json

    import numpy as np

    from galaxalign_batch.model.symbols import SymbolSettings, draw_symbol
    from galaxalign_batch.vocabulary import load_vocabulary

    d = root / "labelled"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    settings = SymbolSettings(size=stamp, supersample=2)
    keys = load_vocabulary("galaxy10").keys
    for split, n in counts.items():
        flux, label = [], []
        for c, k in enumerate(keys):
            for _ in range(n):
                g = draw_symbol(k, settings, rng).mean(0) * rng.uniform(0.3, 1.0)
                flux.append((np.stack([0.3 * g, 0.6 * g, g]) + rng.normal(0, 0.01, (3, stamp, stamp))).astype(np.float32))
                label.append(c)
        np.savez(d / f"{split}.npz", flux=np.stack(flux), label=np.asarray(label, np.int64))
    (d / "manifest.json").write_text(json.dumps({"pixscale": 0.262, "bands": ["g", "r", "z"], "classes": keys}))
    return root


_LEASE_HOLDER = """
import sys, time
from galaxalign_batch import lease
lease.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


class lease_holder:
    """``with lease_holder(target) as proc:`` another process holds ``target``'s lease (galaxalign_batch.lease)
    for the block: a live second writer, as a run started twice would be. Killed and reaped at the end."""

    def __init__(self, target):
        self.target = str(target)

    def __enter__(self):
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _LEASE_HOLDER, self.target], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def ray_train_workers(pid: int) -> list[int]:
    """The Ray Train worker processes below ``pid`` (a driver started with start_new_session)."""
    found = []
    for p in descendants(pid):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_bytes():
                found.append(p)
        except OSError:
            pass
    return found


def kill_a_ray_worker_when(cmd: list[str], cwd, env: dict, log_path, ready, timeout: float = 300):
    """Run ``cmd`` (a command that starts 2 Ray Train workers) until ``ready()`` is true, SIGKILL one of its
    workers, and wait for the command to end; returns (exit code, its log). The command's whole process
    group is killed if the test fails first."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            workers: list[int] = []
            while proc.poll() is None and time.monotonic() < deadline and not ready():
                workers = workers if len(workers) == 2 else ray_train_workers(proc.pid)  # found ahead of the kill
                time.sleep(0.05)
            assert ready(), "not ready to kill:\n" + Path(log_path).read_text()[-3000:]
            workers = workers if len(workers) == 2 else ray_train_workers(proc.pid)
            assert len(workers) == 2, f"Ray Train worker processes: {workers}"
            os.kill(max(workers), signal.SIGKILL)
            rc = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, Path(log_path).read_text()
