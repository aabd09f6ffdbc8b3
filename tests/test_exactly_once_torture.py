"""Torture: a process commits tiles in a loop and is killed with SIGKILL at random moments, 50 times.

Each run takes the store's lock (the killed run's lease is stale), resumes, and commits 2 tiles at a
time with zarr's default write concurrency. The parent lets it finish 0-2 commits, then kills it at a
random moment of the next one (uniform over the commit's measured duration, so kills land anywhere
from its first write to its commit point and just after). After every kill the store must hold
whole tiles only, each tile's rows exactly as it was made, no id twice; the last run finishes the
job and the store must then hold every tile exactly once. Bounded: at most :data:`DEADLINE_S`
seconds. Set ``GALAXALIGN_TORTURE_REPORT=FILE`` to get the figures as JSON.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from galaxalign_batch.store import open_store
from galaxalign_batch.store.verify import verify_store

pytestmark = pytest.mark.slow  # 50 kills of a committing process: minutes on 2 cores

KILLS = 50
DEADLINE_S = 420
N_TILES = 1500
DIM = 16

WRITER = r"""
import sys, zlib
import numpy as np
from galaxalign_batch import lease as lock
from galaxalign_batch.store import EmbeddingStore, store_exists

path, n_tiles, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
DIM = 16

def rows(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = int(rng.integers(0, 10))
    e = rng.normal(size=(n, DIM)); e /= np.linalg.norm(e, axis=1, keepdims=True)
    return dict(embedding=e.astype(np.float32), object_id=np.array([f"{name}/det{i}" for i in range(n)]),
                ra=rng.uniform(0, 360, n), dec=rng.uniform(-80, 80, n), x=np.zeros(n, np.float32),
                y=np.zeros(n, np.float32), masked_fraction=np.zeros(n, np.float32))

lk = lock.acquire(path)
if store_exists(path):
    s = EmbeddingStore.open(path, "r+")
    s.remove_leftovers()
else:
    s = EmbeddingStore.create(path, DIM, attrs={"model": {"id": "torture", "name": "torture"}}, rows_per_chunk=8)
done = s.completed_tiles()
todo = [f"t{i:05d}" for i in range(n_tiles) if f"t{i:05d}" not in done]
print("ready", len(todo), flush=True)
k = 0
while todo:
    part, todo = todo[:batch], todo[batch:]
    print("commit", k, flush=True)
    s.commit([(name, rows(name), "") for name in part])
    print("committed", k, flush=True)
    k += 1
s.finalize()
print("finished", flush=True)
"""


def expected_rows(name: str) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = int(rng.integers(0, 10))
    e = rng.normal(size=(n, DIM))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return n, e.astype(np.float32).astype(np.float16)  # as the writer makes them, then the store keeps them


def check(path) -> dict:
    """Duplicates, and tiles whose committed rows differ from what the tile makes (missing / wrong rows)."""
    s = open_store(path)
    ids = np.asarray(s.read("object_id")).astype(object).astype(str)
    emb = s.read("embedding")
    t = s.tile_table()
    dup = len(ids) - len(set(ids))
    bad = 0
    for name, st, a, c in zip(np.asarray(t["name"]).astype(object).astype(str), t["status"], t["row_start"],
                              t["row_count"]):
        n, e = expected_rows(name)
        if st != 1 or c != n or not (ids[a:a + c] == [f"{name}/det{i}" for i in range(n)]).all() \
                or not np.array_equal(emb[a:a + c], e):
            bad += 1
    return {"rows": s.n_rows, "tiles": len(s.completed_tiles()), "duplicates": dup, "bad_tiles": bad}


def test_fifty_sigkills_of_a_committing_process_lose_and_duplicate_nothing(tmp_path):
    path = tmp_path / "torture.zarr"
    rng = random.Random(11)
    t0 = time.monotonic()
    kills = runs = in_commit = duplicates = bad_tiles = 0
    durations: list[float] = []  # seconds from "commit" to "committed", as the parent sees them
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while kills < KILLS:
        assert time.monotonic() - t0 < DEADLINE_S, f"only {kills} kills in {DEADLINE_S} s"
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(N_TILES), "2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        runs += 1
        first = p.stdout.readline()
        assert first.startswith("ready"), (first, p.stderr.read())
        assert int(first.split()[1]) > 0, "the writer finished every tile before 50 kills: raise N_TILES"
        to_finish, started = rng.randint(0, 2), None
        while True:  # let it finish `to_finish` commits, then catch the start of the next one
            line = p.stdout.readline().strip()
            assert line, p.stderr.read()[-2000:]
            if line.startswith("commit "):
                started = time.monotonic()
                if to_finish == 0:
                    break
            elif line.startswith("committed "):
                durations.append(time.monotonic() - started)
                to_finish -= 1
        typical = float(np.median(durations)) if durations else 0.3
        time.sleep(rng.uniform(0.0, 1.1 * typical))
        p.send_signal(signal.SIGKILL)
        p.wait()
        out = [line for line in p.stdout.read().split("\n") if line]
        kills += 1
        in_commit += not out  # nothing printed after "commit k": killed before that commit finished
        c = check(path)
        duplicates += c["duplicates"]
        bad_tiles += c["bad_tiles"]
        assert c["duplicates"] == 0 and c["bad_tiles"] == 0, (kills, c)
    before_final = c["tiles"]
    assert before_final > 0, "no commit completed between the kills"
    final = subprocess.run([sys.executable, "-c", WRITER, str(path), str(N_TILES), "200"], capture_output=True,
                           text=True, env=env, timeout=300)
    runs += 1
    assert final.returncode == 0 and "finished" in final.stdout, final.stderr[-2000:]
    c = check(path)
    report = verify_store(path)
    assert report.ok, report.lines()
    assert c["tiles"] == N_TILES and c["duplicates"] == 0 and c["bad_tiles"] == 0
    assert c["rows"] == sum(expected_rows(f"t{i:05d}")[0] for i in range(N_TILES))
    assert in_commit >= KILLS // 4, f"only {in_commit} kills landed inside a commit"
    figures = {"kills": kills, "kills_inside_a_commit": in_commit, "runs": runs, "reruns": runs - 1,
               "tiles_committed_between_kills": before_final,
               "median_commit_seconds": round(float(np.median(durations)), 3) if durations else None,
               "duplicates_found": duplicates, "tiles_with_missing_or_wrong_rows": bad_tiles,
               "final_rows": c["rows"], "final_tiles": c["tiles"], "seconds": round(time.monotonic() - t0, 1)}
    print("torture figures:", json.dumps(figures))
    if os.environ.get("GALAXALIGN_TORTURE_REPORT"):
        with open(os.environ["GALAXALIGN_TORTURE_REPORT"], "w") as f:
            json.dump(figures, f, indent=1)
