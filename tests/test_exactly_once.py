"""Exactly once at the store: a crash at every write of a commit and of store creation, one writer per store.

The store's write path (``galaxalign_batch.store.io.before_write``) is replaced by an injector that
stops the writer at its k-th write, for every k: either before the write (a kill between two writes)
or after leaving a torn temporary file (a kill in the middle of a write). After each crash the store
must hold exactly its last complete commit, and a re-run must end equal to a clean run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import zarr

from galaxalign_batch import lease
from galaxalign_batch.store import EmbeddingStore, LockError, StoreError, io as store_io, open_store
from galaxalign_batch.store.verify import verify_store

DIM = 8


class Crash(BaseException):
    """A simulated kill: a BaseException, so no ``except Exception`` cleanup of the writer runs."""


class Injector:
    """Stops the k-th write (counted over the whole test); a crashed store object writes nothing more."""

    def __init__(self):
        self.at: int | None = None
        self.torn = False
        self.count = 0
        self.keys: list[str] = []
        self.dead: list = []  # strong references: a collected store's id() could be reused

    def arm(self, at: int | None, torn: bool = False) -> None:
        self.at, self.torn, self.count, self.keys = at, torn, 0, []

    def __call__(self, store, key: str) -> None:
        if store is not None and any(store is d for d in self.dead):
            raise Crash(f"write {key} of a crashed writer")
        self.count += 1
        self.keys.append(key)
        if self.at is not None and self.count == self.at:
            if self.torn and store is not None and not key.startswith(("delete ", "rename ")):
                target = store.root / key  # a write cut in the middle: a partial temporary file, no rename
                target.parent.mkdir(parents=True, exist_ok=True)
                (target.parent / f"{target.name}.torn{store_io.PARTIAL_SUFFIX}").write_bytes(b"\x00garbage")
            self.dead.append(store)
            raise Crash(f"killed at write {self.count} ({key})")


@pytest.fixture
def inject(monkeypatch):
    inj = Injector()
    monkeypatch.setattr(store_io, "before_write", inj)
    # one zarr write in flight at a time, so that "the k-th write" is well defined (the protocol does
    # not depend on the order of the data writes before the commit point; the torture test runs with
    # zarr's default concurrency)
    with zarr.config.set({"async.concurrency": 1}):
        yield inj


def tile_rows(name: str, n: int) -> dict:
    """Deterministic rows of tile ``name``: a re-run produces exactly the same ones."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    emb = rng.normal(size=(n, DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return dict(embedding=emb.astype(np.float32), object_id=np.array([f"{name}/det{i}" for i in range(n)]),
                ra=rng.uniform(0, 360, n), dec=rng.uniform(-80, 80, n), tile=np.full(n, name),
                x=rng.uniform(0, 50, n).astype(np.float32), y=rng.uniform(0, 50, n).astype(np.float32),
                masked_fraction=rng.uniform(0, 1, n).astype(np.float32))


#: the run's tiles, in commit batches; None marks a tile that fails (with its reason)
BATCHES = [[("a", 5), ("b", 7)], [("c", 0), ("d", 6), ("f", None)], [("e", 4)]]
ATTRS = {"model": {"id": "synthetic", "name": "synthetic", "kind": "test"}}


def _entry(name, n):
    return (name, None, f"{name}.fits: truncated FITS file") if n is None else (name, tile_rows(name, n), "")


def run(path, batches=BATCHES, store=None) -> EmbeddingStore:
    """What `embed` does with the store: create or resume, skip the done tiles, commit the rest, finalize."""
    if store is None:
        store = (EmbeddingStore.open(path, "r+") if os.path.exists(path)
                 else EmbeddingStore.create(path, DIM, attrs=ATTRS, rows_per_chunk=4))
    for batch in batches:
        done = store.completed_tiles()
        todo = [_entry(name, n) for name, n in batch if name not in done]
        if todo:
            store.commit(todo)
    store.finalize()
    return store


def content(path) -> dict:
    """Every committed row by object id (exactly once checked), plus the done and failed tiles."""
    s = open_store(path)
    ids = s.read("object_id").astype(object).astype(str)
    assert len(set(ids)) == len(ids) == s.n_rows, "duplicate object ids"
    emb, ra, tile = s.read("embedding"), s.read("ra"), s.read("tile").astype(object).astype(str)
    rows = {i: (emb[k].tobytes(), float(ra[k]), tile[k]) for k, i in enumerate(ids)}
    return {"rows": rows, "done": s.completed_tiles(), "failed": s.failed_tiles()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    with lease.locked(path):
        run(path)
    ref = content(path)
    assert len(ref["rows"]) == 22 and ref["done"] == {"a", "b", "c", "d", "e"} and set(ref["failed"]) == {"f"}
    return ref


def _committed(path) -> set[str]:
    return open_store(path).completed_tiles()


def test_a_commit_becomes_visible_in_one_write_the_last(tmp_path, inject):
    s = EmbeddingStore.create(tmp_path / "s.zarr", DIM, attrs=ATTRS, rows_per_chunk=4)
    inject.arm(None)
    s.commit([_entry("a", 5), _entry("b", 7)])
    assert inject.keys.count("zarr.json") == 1 and inject.keys[-1] == "zarr.json"   # the commit point
    assert all(k.startswith(("embedding/", "tiles/")) or "/" in k for k in inject.keys[:-1])


@pytest.mark.slow  # fast tier: make test; everything: make test-all (CI)
@pytest.mark.parametrize("torn", [False, True], ids=["between-writes", "mid-write"])
def test_a_crash_at_every_write_of_a_commit_then_rerun_equals_a_clean_run(tmp_path, inject, reference, torn):
    # how many writes the second commit makes
    probe = tmp_path / "probe.zarr"
    s = EmbeddingStore.create(probe, DIM, attrs=ATTRS, rows_per_chunk=4)
    s.commit([_entry("a", 5), _entry("b", 7)])
    inject.arm(None)
    s.commit([_entry(n, k) for n, k in BATCHES[1]])
    writes = inject.count
    assert writes > 20
    for k in range(1, writes + 1):
        path = tmp_path / f"k{k}.zarr"
        inject.arm(None)
        s = EmbeddingStore.create(path, DIM, attrs=ATTRS, rows_per_chunk=4)
        s.commit([_entry("a", 5), _entry("b", 7)])
        inject.arm(k, torn)
        with pytest.raises(Crash):
            s.commit([_entry(n, c) for n, c in BATCHES[1]])
        inject.arm(None)
        # the crash left the last complete commit: before it, or (crash after the commit point) after it
        assert _committed(path) == ({"a", "b", "c", "d"} if k > writes else {"a", "b"}), k
        report = verify_store(path)
        assert report.ok, (k, report.lines())
        run(path)  # the re-run resumes
        assert content(path) == reference, f"crash at write {k} of {writes}"
        EmbeddingStore.open(path, "r+").remove_leftovers()  # what embed's resume does with torn writes
        assert not any(f.endswith(store_io.PARTIAL_SUFFIX) for _, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow  # fast tier: make test; everything: make test-all (CI)
def test_a_crash_at_every_write_of_store_creation_leaves_no_store(tmp_path, inject, reference):
    inject.arm(None)
    EmbeddingStore.create(tmp_path / "probe.zarr", DIM, attrs=ATTRS, rows_per_chunk=4)
    writes = inject.count
    assert inject.keys[-1].startswith("rename ") and writes > 15
    for k in range(1, writes + 1):
        path = tmp_path / f"k{k}.zarr"
        inject.arm(k)
        with pytest.raises(Crash):
            EmbeddingStore.create(path, DIM, attrs=ATTRS, rows_per_chunk=4)
        inject.arm(None)
        assert not os.path.exists(path), f"a half-made store after a crash at write {k} of {writes}"
        leftovers = [e for e in os.listdir(tmp_path) if e.startswith(f".k{k}.zarr.creating-")]
        assert len(leftovers) == 1
        with lease.locked(path):  # the re-run, as embed runs it: under the lock
            run(path)
        assert content(path) == reference
        assert not [e for e in os.listdir(tmp_path) if e.startswith(f".k{k}.zarr.creating-")]


@pytest.mark.slow  # fast tier: make test; everything: make test-all (CI)
def test_a_crash_while_finalizing_keeps_every_row(tmp_path, inject, reference):
    inject.arm(None)
    s = EmbeddingStore.create(tmp_path / "probe.zarr", DIM, attrs=ATTRS, rows_per_chunk=4)
    for batch in BATCHES:
        s.commit([_entry(n, c) for n, c in batch])
    inject.arm(None)
    s.finalize()
    writes = inject.count
    for k in range(1, writes + 1):
        path = tmp_path / f"k{k}.zarr"
        inject.arm(None)
        s = EmbeddingStore.create(path, DIM, attrs=ATTRS, rows_per_chunk=4)
        for batch in BATCHES:
            s.commit([_entry(n, c) for n, c in batch])
        inject.arm(k)
        with pytest.raises(Crash):
            s.finalize()
        inject.arm(None)
        assert content(path) == reference and verify_store(path).ok
        run(path)
        assert content(path) == reference and open_store(path).attrs["complete"] is True


def test_a_second_writer_object_cannot_commit_over_the_first(tmp_path):
    path = tmp_path / "s.zarr"
    EmbeddingStore.create(path, DIM, attrs=ATTRS, rows_per_chunk=4)
    one, two = EmbeddingStore.open(path, "r+"), EmbeddingStore.open(path, "r+")
    one.commit([_entry("a", 5)])
    with pytest.raises(StoreError, match="another writer committed to the store since this process opened it"):
        two.commit([_entry("b", 3)])
    assert content(path)["done"] == {"a"}


# ---------------------------------------------------------------------------------------------- the lock

HOLDER = """
import sys, time
from galaxalign_batch import lease as lock
lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _holder(store) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_live_holder_is_refused_with_one_line_and_a_dead_one_is_taken_over(tmp_path, caplog):
    store = tmp_path / "s.zarr"
    holder = _holder(store)
    try:
        with pytest.raises(LockError) as e:
            lease.acquire(store)
        msg = str(e.value)
        assert "\n" not in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert "--force-unlock" in msg and "last heartbeat" in msg
        with pytest.raises(LockError):  # a library writer without the lock is refused too
            EmbeddingStore.create(store, DIM, attrs=ATTRS)
        assert not os.path.exists(store)
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level("WARNING"):
        lock = lease.acquire(store)  # the holder is gone: its lease is stale
    assert any("stale lock" in r.getMessage() and "process is gone" in r.getMessage() for r in caplog.records)
    assert lease.read_lease(lock.path)["pid"] == os.getpid()
    lease.release(lock)
    assert not os.path.exists(lock.path)


def test_a_killed_holder_not_yet_reaped_is_gone(tmp_path, caplog):
    """SIGKILLed but not waited for (a zombie: ``timeout -s KILL`` dies with its child, which stays a zombie
    until init reaps it): kill(pid, 0) still succeeds, yet the holder writes nothing more."""
    store = tmp_path / "s.zarr"
    holder = _holder(store)
    try:
        holder.kill()
        deadline = time.time() + 10
        while time.time() < deadline:  # until the kernel has made it a zombie (we do not reap it yet)
            with open(f"/proc/{holder.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the killed holder never became a zombie")
        with caplog.at_level("WARNING"):
            lock = lease.acquire(store)
        assert any("process is gone" in r.getMessage() for r in caplog.records)
        lease.release(lock)
    finally:
        holder.wait()


def _fake_lease(store, host: str, age_s: float, **extra) -> str:
    path = lease.lock_path(store)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": 12345, "started": "then", "command": "galaxalign-batch embed ...",
                   "token": "other", **extra}, f)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_stale_rules_for_other_hosts_recycled_pids_and_force_unlock(tmp_path):
    store = tmp_path / "s.zarr"
    _fake_lease(store, "node-17", age_s=5)  # another host, fresh heartbeat: held
    with pytest.raises(LockError, match="host node-17 pid 12345"):
        lease.acquire(store)
    lock = lease.acquire(store, force=True)  # --force-unlock
    lease.release(lock)
    _fake_lease(store, "node-17", age_s=lease.STALE_S + 30)  # its heartbeat stopped: stale
    lease.release(lease.acquire(store))
    # this host, a pid that exists (ours) but started at another time: the pid was recycled
    _fake_lease(store, socket.gethostname(), age_s=0, pid=os.getpid(), pid_start="1", boot_id=lease._boot_id())
    path = lease.lock_path(store)
    holder = lease.read_lease(path)
    holder["pid"] = os.getpid()
    assert holder.stale_reason() == "its pid now belongs to another process"
    lease.release(lease.acquire(store))


def test_a_writer_whose_lock_was_taken_stops_before_its_next_commit(tmp_path):
    path = tmp_path / "s.zarr"
    lock = lease.acquire(path)
    try:
        s = EmbeddingStore.create(path, DIM, attrs=ATTRS, rows_per_chunk=4)
        s.commit([_entry("a", 5)])
        os.unlink(lock.path)
        _fake_lease(path, "node-3", age_s=0)  # someone ran with --force-unlock
        with pytest.raises(LockError, match="lost its lock"):
            s.commit([_entry("b", 3)])
        assert content(path)["done"] == {"a"}
    finally:
        os.unlink(lock.path)
        lease.release(lock)


def test_readers_need_no_lock(tmp_path):
    path = tmp_path / "s.zarr"
    with lease.locked(path):
        run(path)
    holder = _holder(path)
    try:
        assert open_store(path).n_rows == 22 and verify_store(path).ok
    finally:
        holder.kill()
        holder.wait()


def test_the_old_module_name_still_works_and_warns(tmp_path):
    """``galaxalign_batch.store.lock`` (before the lease also guarded training folders) re-exports the lease."""
    import importlib
    import sys
    import warnings

    sys.modules.pop("galaxalign_batch.store.lock", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("galaxalign_batch.store.lock")
    assert any(issubclass(w.category, DeprecationWarning) and "galaxalign_batch.lease" in str(w.message)
               for w in caught)
    assert old.locked is lease.locked and old.LockError is LockError
    with old.locked(tmp_path / "s.zarr"):
        assert lease.held(tmp_path / "s.zarr") is not None
