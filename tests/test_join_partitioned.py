"""`join` at scale (issue 19): the partitioned join (HEALPix partitions, streamed catalogue, one Parquet file
per partition and a _SUCCESS manifest) equals the one-file join row for row, locally and on a 2-node
loopback Ray cluster (RA wrap and poles included); a worker killed mid-join, then a re-run, gives the same
output; the join's memory stays flat when the catalogue grows 10x."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galaxalign_batch import atomic
from galaxalign_batch.downstream.join import join_catalog
from galaxalign_batch.downstream.partitioned import SUCCESS, join_partitioned, read_partitioned
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore, open_store

MODEL = {"id": "synthetic-0", "name": "synthetic", "kind": "test"}
DIM = 8
ENV = dict(os.environ, GALAXALIGN_PROGRESS="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")


def _regions(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in four small regions: across RA 0/360, at both poles, and an ordinary field."""
    part = n // 4
    ra = np.concatenate([rng.uniform(-0.05, 0.05, part) % 360.0, rng.uniform(0, 360, part), rng.uniform(0, 360, part),
                         rng.uniform(150.0, 150.1, n - 3 * part)])
    dec = np.concatenate([rng.uniform(-0.05, 0.05, part),
                          90.0 - np.degrees(np.arccos(rng.uniform(np.cos(np.radians(0.05)), 1, part))),
                          -90.0 + np.degrees(np.arccos(rng.uniform(np.cos(np.radians(0.05)), 1, part))),
                          rng.uniform(2.0, 2.1, n - 3 * part)])
    return ra, dec


def make_store(path, ra, dec, *, rows_per_chunk=128, tile_rows=500, seed=0) -> str:
    rng = np.random.default_rng(seed)
    n = len(ra)
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store = EmbeddingStore.create(path, DIM, attrs={"model": MODEL, "vocabulary": None, "cutout_spec": None},
                                  rows_per_chunk=rows_per_chunk, durable=False)
    for t, s in enumerate(range(0, n, tile_rows)):
        sl = slice(s, s + tile_rows)
        m = len(ra[sl])
        store.commit([(f"tile{t}", dict(embedding=emb[sl], object_id=np.array([f"tile{t}/det{i}" for i in range(m)]),
                                        ra=ra[sl], dec=dec[sl], tile=np.full(m, f"tile{t}"),
                                        x=np.zeros(m, np.float32), y=np.zeros(m, np.float32),
                                        masked_fraction=np.zeros(m, np.float32)), "")])
    store.finalize()
    return str(path)


def make_catalog(store_path, m: int, seed: int = 1, payload: int = 0) -> pa.Table:
    """Half the rows 0.1-1.5 arcsec from stored sources (one exactly on the duplicated position), half anywhere in
    the same regions, a few without a position; ``payload`` float64 columns of ballast."""
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    rng = np.random.default_rng(seed)
    s = open_store(store_path)
    sra, sdec = s.read("ra"), s.read("dec")
    pick = rng.choice(len(sra), m // 2, replace=len(sra) < m // 2)
    pick[0] = 0
    c = SkyCoord(sra[pick] * u.deg, sdec[pick] * u.deg).directional_offset_by(
        rng.uniform(0, 360, len(pick)) * u.deg, rng.uniform(0.1, 1.5, len(pick)) * u.arcsec)
    near_ra, near_dec = c.ra.deg, c.dec.deg
    near_ra[0], near_dec[0] = sra[0], sdec[0]
    far_ra, far_dec = _regions(rng, m - len(pick))
    ra, dec = np.concatenate([near_ra, far_ra]), np.concatenate([near_dec, far_dec])
    ra[5], dec[7] = np.nan, 95.0  # no valid position: unmatched, kept
    cols = {"name": pa.array([f"c{i}" for i in range(m)]), "RA": pa.array(ra), "DEC": pa.array(dec)}
    for j in range(payload):
        cols[f"w{j}"] = pa.array(rng.normal(size=m))
    return pa.table(cols)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    ra, dec = _regions(rng, 4000)
    ra[1], dec[1] = ra[0], dec[0]  # an exact duplicate position: ties go to the lower row
    return make_store(tmp_path_factory.mktemp("pjoin") / "s.zarr", ra, dec)


@pytest.fixture(scope="module")
def catalog(store_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("pcat") / "cat.parquet"
    pq.write_table(make_catalog(store_path, 1200), path, row_group_size=100)
    return str(path)


@pytest.fixture(scope="module")
def reference(store_path, catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "one.parquet"
    join_catalog(store_path, catalog, out, radius=1.0, workers=1)
    return pq.read_table(out)


def _same(partitioned: pa.Table, reference: pa.Table) -> None:
    assert partitioned.column("catalog_row").to_pylist() == list(range(reference.num_rows))
    got = partitioned.drop_columns(["catalog_row"])
    assert got.column_names == reference.column_names
    for name in reference.column_names:
        assert _values(got.column(name)) == _values(reference.column(name)), name


def _values(col) -> list:
    return ["NaN" if isinstance(v, float) and v != v else v for v in col.to_pylist()]


def test_partitioned_equals_the_one_file_join_locally(store_path, catalog, reference, tmp_path):
    out = tmp_path / "joined"
    s = join_partitioned(store_path, catalog, out, radius=1.0, threads=2, partition_rows=300, split_rows=250)
    assert s.partitions > 4, s  # really cut: the four regions, and more
    manifest = json.loads((out / SUCCESS).read_text())
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert files == sorted(p["file"] for p in manifest["partitions"])
    assert not atomic.partials(out) and not (out / "_spill").exists()
    assert manifest["catalog_rows"] == 1200 and manifest["matched"] == s.matched
    assert s.matched == int(reference.column("store_row").is_valid().to_numpy(zero_copy_only=False).sum())
    _same(read_partitioned(out), reference)
    # the one-file join found the duplicated position's lower row; so did the partitions
    again = join_partitioned(store_path, catalog, out, radius=1.0, threads=2, partition_rows=300, split_rows=250)
    assert again.up_to_date


def test_csv_and_fits_catalogues_are_streamed_alike(store_path, catalog, reference, tmp_path):
    from astropy.table import Table

    t = pq.read_table(catalog)
    csv = tmp_path / "cat.csv"
    import pyarrow.csv as pcsv

    pcsv.write_csv(t, csv)
    fits = tmp_path / "cat.fits"
    Table(t.to_pydict()).write(fits)
    for path in (csv, fits):
        out = tmp_path / f"j-{path.suffix[1:]}"
        join_partitioned(store_path, path, out, radius=1.0, threads=1, partition_rows=500, split_rows=300)
        got = read_partitioned(out)
        assert got.column("store_row").to_pylist() == reference.column("store_row").to_pylist(), path
        assert got.column("name").to_pylist() == reference.column("name").to_pylist()


def test_refusals(store_path, catalog, tmp_path):
    with pytest.raises(ConfigError, match="folder"):
        join_partitioned(store_path, catalog, tmp_path / "x.parquet", radius=1.0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other files"):
        join_partitioned(store_path, catalog, tmp_path / "busy", radius=1.0)


def test_a_second_join_into_the_same_folder_is_refused(store_path, catalog, reference, tmp_path, caplog):
    """Before the lease, a second join into a folder another was writing removed the first's spill and
    partition files: one of the two died with a FileNotFoundError traceback, or both finished and the
    folder held one join's ``_SUCCESS`` beside the other's plan."""
    from conftest import lease_holder

    from galaxalign_batch.cli import main
    from galaxalign_batch.lease import LockError

    out = tmp_path / "joined"
    join_partitioned(store_path, catalog, out, radius=1.0, threads=1, partition_rows=300, split_rows=250)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with lease_holder(out) as other:
        with pytest.raises(LockError, match=f"pid {other.pid}"):
            join_partitioned(store_path, catalog, out, radius=2.0, threads=1, force=True)
        assert main(["join", "--store", store_path, "--catalog", catalog, "--out", str(out), "--radius", "2",
                     "--force"]) == 1
        err = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(err) == 1 and "is being written by another run" in err[0] and "--force-unlock" in err[0]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
        # the holder is alive, but the user knows better
        join_partitioned(store_path, catalog, out, radius=1.0, threads=1, partition_rows=300, split_rows=250,
                         force=True, force_unlock=True)
    _same(read_partitioned(out), reference)


def test_another_plan_starts_afresh(store_path, catalog, tmp_path):
    out = tmp_path / "j"
    join_partitioned(store_path, catalog, out, radius=1.0, threads=1, partition_rows=300, split_rows=250)
    first = {p.name for p in out.glob("part-*")}
    s = join_partitioned(store_path, catalog, out, radius=2.0, threads=1, partition_rows=2000, split_rows=250)
    assert not s.up_to_date and s.done_before == 0
    manifest = json.loads((out / SUCCESS).read_text())
    assert {p.name for p in out.glob("part-*")} == {p["file"] for p in manifest["partitions"]} != first


# ---------------------------------------------------------------------------------------------- Ray

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loopback_cluster():
    """Two Ray nodes on this machine (a head and a worker node, one CPU each), stopped by process group."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="rayj", dir="/tmp")
    procs = []
    try:
        procs.append(subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                       "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                                       f"--temp-dir={tmp}", "--block"], env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(3)
        procs.append(subprocess.Popen([ray_bin, "start", f"--address={addr}", "--node-ip-address=127.0.0.1",
                                       "--num-cpus=1", "--disable-usage-stats", "--block"], env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        import ray

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if not ray.is_initialized():
                    ray.init(address=addr, log_to_driver=False, include_dashboard=False)
                if sum(n["Alive"] for n in ray.nodes()) == 2:
                    break
            except Exception:  # the head is still starting
                pass
            time.sleep(1)
        else:
            pytest.fail("the loopback cluster did not come up with 2 nodes")
        yield addr
    finally:
        import ray

        ray.shutdown()
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # the head's --temp-dir (sessions, logs): one left per run before


@pytest.mark.slow
def test_two_node_cluster_join_equals_the_local_join(loopback_cluster, store_path, catalog, reference, tmp_path):
    import ray

    out = tmp_path / "ray"
    s = join_partitioned(store_path, catalog, out, radius=1.0, address=loopback_cluster, partition_rows=300,
                         split_rows=250)
    assert s.executor == "ray" and s.slots == 2 and s.partitions > 4
    assert sum(n["Alive"] for n in ray.nodes()) == 2
    _same(read_partitioned(out), reference)


@pytest.mark.slow
def test_a_killed_worker_then_a_rerun_gives_the_same_output(loopback_cluster, store_path, catalog, reference,
                                                            tmp_path, monkeypatch):
    out = tmp_path / "killed"
    # partition 3's worker is SIGKILLed half-way through its file, and Ray is told not to retry: the join fails
    monkeypatch.setenv("GALAXALIGN_JOIN_FAULT", "KILL:3")
    with pytest.raises(Exception):
        join_partitioned(store_path, catalog, out, radius=1.0, address=loopback_cluster, partition_rows=300,
                         split_rows=250, retries=0)
    assert not (out / SUCCESS).exists()
    assert not [p for p in out.glob("part-*") if p.name.endswith(".parquet") and p.stat().st_size == 0]
    monkeypatch.delenv("GALAXALIGN_JOIN_FAULT")
    s = join_partitioned(store_path, catalog, out, radius=1.0, address=loopback_cluster, partition_rows=300,
                         split_rows=250)
    assert s.done_before >= 1  # the partitions finished before the kill are kept, not redone
    assert not atomic.partials(out)
    _same(read_partitioned(out), reference)
    assert s.partitions > 4

    # killed once, retried by Ray (the default): the same output in one run
    out2 = tmp_path / "retried"
    monkeypatch.setenv("GALAXALIGN_JOIN_FAULT", f"KILL:2:{tmp_path / 'killed-once'}")
    join_partitioned(store_path, catalog, out2, radius=1.0, address=loopback_cluster, partition_rows=300,
                     split_rows=250)
    assert (tmp_path / "killed-once").exists()
    _same(read_partitioned(out2), reference)


# ---------------------------------------------------------------------------------------------- memory

RSS_SCRIPT = textwrap.dedent("""\
    import sys
    from galaxalign_batch.downstream.partitioned import join_partitioned
    from galaxalign_batch.downstream.join import join_catalog
    store, cat, out, how = sys.argv[1:5]
    if how == "partitioned":
        join_partitioned(store, cat, out, radius=1.0, threads=1, split_rows=8192)
    else:
        join_catalog(store, cat, out, radius=1.0, workers=1)
    # VmHWM, not getrusage's ru_maxrss: that one starts at the parent's peak (kept across fork and exec)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024)
""")


def _peak_mb(store, cat, out, how) -> int:
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(store), str(cat), str(out), how], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


# Growth of the partitioned join's peak RSS (VmHWM) when the catalogue grows 10x (12 -> 123 MB of Parquet): measured
# +25 MB with Arrow's default (mimalloc) pool, +2 MB with jemalloc (what grows is the allocator's retention, not
# data held); the one-file join grows by +259 MB.
BOUND_MB = 60


@pytest.mark.slow
def test_join_memory_stays_flat_when_the_catalogue_grows_tenfold(store_path, tmp_path):
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    pq.write_table(make_catalog(store_path, 20_000, payload=64), small, row_group_size=8192)
    pq.write_table(make_catalog(store_path, 200_000, payload=64), big, row_group_size=8192)
    a = _peak_mb(store_path, small, tmp_path / "o-small", "partitioned")
    b = _peak_mb(store_path, big, tmp_path / "o-big", "partitioned")
    assert b - a < BOUND_MB, f"peak RSS {a} MB -> {b} MB for a 10x catalogue"
    # the one-file join holds the catalogue: the same growth breaks the bound (the test can fail)
    c = _peak_mb(store_path, small, tmp_path / "small.out.parquet", "one-file")
    d = _peak_mb(store_path, big, tmp_path / "big.out.parquet", "one-file")
    assert d - c > BOUND_MB, f"one-file join: {c} MB -> {d} MB"


def test_cli_writes_a_folder_and_refuses_address_with_one_file(store_path, catalog, reference, tmp_path, capsys):
    from galaxalign_batch.cli import main

    out = tmp_path / "cli"
    assert main(["join", "--store", store_path, "--catalog", catalog, "--out", str(out), "--threads", "1",
                 "--partition-rows", "300"]) == 0
    assert "partition files" in capsys.readouterr().out
    _same(read_partitioned(out), reference)
    assert main(["join", "--store", store_path, "--catalog", catalog, "--out", str(tmp_path / "a.parquet"),
                 "--address", "local"]) == 2


# ---------------------------------------------------------------------------------------------- classify, fewshot

@pytest.mark.slow
def test_classify_and_fewshot_on_the_cluster_equal_the_local_run(loopback_cluster, tmp_path):
    """The row batches are Ray tasks on both nodes; the lock holder writes them in order: the same arrays."""
    import shutil

    from galaxalign_batch.downstream.classify import Scorer, classify_store, zero_shot_probs
    from galaxalign_batch.fewshot.apply import apply_head
    from galaxalign_batch.fewshot.heads import fit_head

    rng = np.random.default_rng(3)
    ra, dec = _regions(rng, 3000)
    local = make_store(tmp_path / "local.zarr", ra, dec, rows_per_chunk=128)
    remote = str(tmp_path / "remote.zarr")
    shutil.copytree(local, remote)
    protos = rng.normal(size=(3, DIM)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    args = (protos, 20.0, "auto")

    def scorer():
        return Scorer(MODEL, "text", ["a", "b", "c"], ["A", "B", "C"],
                      lambda st, a, b: zero_shot_probs(a, b, st.path, *args), task=lambda: (zero_shot_probs, args))

    s1 = classify_store(local, scorer(), batch_rows=256)
    s2 = classify_store(remote, scorer(), batch_rows=256, address=loopback_cluster)
    assert s1.counts == s2.counts and sum(s1.counts.values()) == 3000
    a, b = open_store(local), open_store(remote)
    for name in ("probs", "label", "confidence"):
        assert np.array_equal(a.read(name), b.read(name)), name

    X = a.read_embeddings(slice(0, 300)).astype(np.float32)
    head = fit_head(X, (X[:, 0] > 0).astype(int), ["neg", "pos"], validate=False,
                    source={"model": MODEL})
    apply_head(local, head, "sign", batch_rows=256)
    apply_head(remote, head, "sign", batch_rows=256, address=loopback_cluster)
    a, b = open_store(local), open_store(remote)
    for name in ("probs", "label", "confidence"):
        assert np.array_equal(a.read(f"fewshot/sign/{name}"), b.read(f"fewshot/sign/{name}")), name
