"""Exactly once through `embed`: concurrent resumes, crashes in the driver, unique tile keys and object ids,
pre-flight checks before Ray starts, `--catalog detect`, and the declared-image-size limit.

One local Ray (2 CPUs) for the module; inputs are small (real DECaLS cubes, 128-px simulated bricks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from galaxalign_batch.engine import embed_tiles  # noqa: E402
from galaxalign_batch.survey.tiles import resolve_tiles
from galaxalign_batch.store import io as store_io, open_store  # noqa: E402
from galaxalign_batch.store.verify import verify_store  # noqa: E402

pytestmark = pytest.mark.slow  # Ray runs killed at commit points, concurrent writers: make test-all (CI)

CLI = [sys.executable, "-m", "galaxalign_batch", "--no-progress", "--log-level", "WARNING"]
ENV = dict(os.environ, GALAXALIGN_PROGRESS="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
BRICK = "1501p022"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cubes(tmp_path_factory, cutouts_dir):
    d = tmp_path_factory.mktemp("cubes")
    for name in ["example_a", "example_b", "temp_small", "example_bad_pix"]:
        shutil.copy(cutouts_dir / f"{name}.fits", d / f"{name}.fits")
    return d


def _strings(values) -> np.ndarray:
    return np.asarray(values).astype(object).astype(str)


def content(path) -> dict[str, np.ndarray]:
    """object id -> embedding (float32) of every committed row; exactly once checked."""
    s = open_store(path)
    ids = _strings(s.read("object_id"))
    assert len(set(ids)) == len(ids) == s.n_rows
    emb = s.read("embedding").astype(np.float32)
    return dict(zip(ids, emb))


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-3, rtol=0)  # float16 storage, thread-count rounding


@pytest.fixture(scope="module")
def clean(cubes, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    summary = embed_tiles(resolve_tiles([str(cubes)]), "tiny", out, batch_size=64, cpu_threads=2)
    assert summary.ok and summary.tiles_done == 4
    return content(out)


# ---------------------------------------------------------------------------------------------- one writer

def test_two_concurrent_resumes_one_proceeds_the_other_refuses_with_the_lock(cubes, clean, tmp_path):
    out = tmp_path / "s.zarr"
    first = resolve_tiles([str(cubes)])[:2]
    assert embed_tiles(first, "tiny", out, batch_size=64, cpu_threads=2).tiles_done == 2  # a partial store
    cmd = CLI + ["embed", "--tiles", str(cubes), "--out", str(out), "--model", "tiny", "--cpu-workers", "2",
                 "--batch-size", "64"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, _, err in results if rc == 1)
    lines = [ln for ln in loser.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is being written by another run" in lines[0] and "--force-unlock" in lines[0], loser
    winner = next(out_ for rc, out_, _ in results if rc == 0)
    assert "2 embedded, 2 already done" in winner
    assert_same(content(out), clean)
    assert verify_store(out).ok
    assert not os.path.exists(str(out) + ".lock")


# ---------------------------------------------------------------------------------------------- crashes

class Crash(BaseException):
    pass


@pytest.mark.parametrize("where", ["creation-rename", "first-commit-point", "third-commit-point"])
def test_a_driver_crash_at_a_commit_point_then_rerun_equals_a_clean_run(cubes, clean, tmp_path, monkeypatch, where):
    out = tmp_path / "s.zarr"
    seen = {"commit": 0}

    def hook(store, key):
        if where == "creation-rename" and key.startswith("rename "):
            raise Crash(key)
        if key == "zarr.json" and store is not None and os.path.realpath(store.root) == os.path.realpath(out):
            seen["commit"] += 1
            if seen["commit"] == {"first-commit-point": 1, "third-commit-point": 3}.get(where):
                raise Crash(key)

    monkeypatch.setattr(store_io, "before_write", hook)
    with pytest.raises(Crash):
        embed_tiles(resolve_tiles([str(cubes)]), "tiny", out, batch_size=64, commit_rows=1, cpu_threads=2)
    monkeypatch.setattr(store_io, "before_write", lambda store, key: None)
    if where == "creation-rename":
        assert not os.path.exists(out)
    else:
        assert len(open_store(out).completed_tiles()) == {"first-commit-point": 0, "third-commit-point": 2}[where]
    again = embed_tiles(resolve_tiles([str(cubes)]), "tiny", out, batch_size=64, commit_rows=1, cpu_threads=2)
    assert again.ok
    assert_same(content(out), clean)
    assert verify_store(out).ok
    assert not [e for e in os.listdir(tmp_path) if ".creating-" in e]


# ---------------------------------------------------------------------------------------------- identities

def test_same_named_cubes_in_two_folders_symlinks_and_spellings(cutouts_dir, tmp_path):
    for folder, src in (("north", "example_a"), ("south", "temp_small")):
        (tmp_path / folder).mkdir()
        shutil.copy(cutouts_dir / f"{src}.fits", tmp_path / folder / "cutout.fits")
    (tmp_path / "links").mkdir()
    os.symlink(tmp_path / "north" / "cutout.fits", tmp_path / "links" / "alias.fits")
    spelled = str(tmp_path / "south" / ".." / "south" / "cutout.fits")
    tiles = resolve_tiles([str(tmp_path / "north"), str(tmp_path / "south"), str(tmp_path / "links"), spelled])
    keys = [t.name for t in tiles]
    assert keys == sorted({os.path.realpath(tmp_path / "north" / "cutout.fits"),
                           os.path.realpath(tmp_path / "south" / "cutout.fits")})
    out = tmp_path / "s.zarr"
    summary = embed_tiles(tiles, "tiny", out, batch_size=64, cpu_threads=2)
    assert summary.ok and summary.tiles_done == 2
    s = open_store(out)
    ids, tile = _strings(s.read("object_id")), _strings(s.read("tile"))
    assert len(set(ids)) == len(ids) == s.n_rows
    for key in keys:  # detected ids name the resolved file: the two cutout.fits cannot collide
        mine = ids[tile == key]
        assert len(mine) > 0 and all(i.startswith(key + "/det") for i in mine)
    # the symlink and the other spelling are the same tiles: a re-run with them does nothing
    again = embed_tiles(resolve_tiles([str(tmp_path / "links"), spelled]), "tiny", out, batch_size=64, cpu_threads=2)
    assert again.tiles_skipped == 2 and again.tiles_done == 0 and open_store(out).n_rows == s.n_rows


def _set_release(catalog, release: int) -> None:
    import fitsio

    data = fitsio.read(str(catalog), ext=1)
    data["release"] = release
    fitsio.write(str(catalog), data, clobber=True)


@pytest.fixture(scope="module")
def north_south(tmp_path_factory):
    """One brick name under a north and a south root (different skies; DR9 releases 9011 and 9010)."""
    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.survey import layout

    d = tmp_path_factory.mktemp("ns")
    for region, seed, release in (("north", 1, 9011), ("south", 2, 9010)):
        simulate_survey(d / region, bricks=[BRICK], size=128, seed=seed, density=20000, stars=50, no_coverage=0)
        _set_release(layout.tractor_path(d / region, BRICK), release)
    return d


def test_one_brick_name_under_north_and_south_roots_is_two_tiles(north_south, tmp_path):
    from galaxalign_batch.survey import layout, read_tractor

    n, s_ = north_south / "north", north_south / "south"
    tiles = resolve_tiles([str(n), str(s_)])
    assert [t.name for t in tiles] == [str(layout.coadd_dir(os.path.realpath(r), BRICK)) for r in (n, s_)]
    out = tmp_path / "s.zarr"
    summary = embed_tiles(tiles, "tiny", out, batch_size=64, cpu_threads=2)
    assert summary.ok and summary.tiles_done == 2
    store = open_store(out)
    expected = sum(len(read_tractor(layout.tractor_path(r, BRICK))) for r in (n, s_))
    ids = _strings(store.read("object_id"))
    assert store.n_rows == expected > 10 and len(set(ids)) == len(ids)        # nothing dropped, nothing twice
    assert {i.split("/")[0] for i in ids} == {"9011", "9010"}
    # a mirror of the south root (the same catalog again) is a clear failure, not duplicates or a silent drop
    mirror = tmp_path / "mirror"
    shutil.copytree(s_, mirror)
    again = embed_tiles(resolve_tiles([str(n), str(s_), str(mirror)]), "tiny", out, batch_size=64, cpu_threads=2)
    (name, reason), = again.tiles_failed.items()
    assert name == str(layout.coadd_dir(os.path.realpath(mirror), BRICK))
    assert "already taken by tile" in reason and str(os.path.realpath(s_)) in reason
    assert open_store(out).n_rows == expected and verify_store(out).ok


def test_catalog_detect_works(north_south, tmp_path):
    out = tmp_path / "s.zarr"
    tiles = resolve_tiles([str(north_south / "north")])
    summary = embed_tiles(tiles, "tiny", out, batch_size=64, catalog="detect", cpu_threads=2)
    assert summary.ok and summary.tiles_done == 1 and summary.sources > 0
    ids = _strings(open_store(out).read("object_id"))
    assert all(i.startswith(tiles[0].name + "/det") for i in ids)


# ---------------------------------------------------------------------------------------------- pre-flight

PREFLIGHT = """
import sys
from galaxalign_batch.cli import main
rc = main(sys.argv[1:])
print("rc", rc, "ray-imported", "ray" in sys.modules)
"""


def _preflight(*args) -> tuple[str, list[str]]:
    r = subprocess.run([sys.executable, "-c", PREFLIGHT, "--no-progress", "--log-level", "WARNING", "embed", *args], env=ENV,
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip().splitlines()[-1], [ln for ln in r.stderr.splitlines() if ln.strip()]


def test_bad_values_and_a_held_lock_are_refused_before_ray_starts(cubes, tmp_path):
    out = tmp_path / "s.zarr"
    base = ["--tiles", str(cubes), "--out", str(out), "--model", "tiny"]
    cases = [
        (base + ["--sources", str(tmp_path / "missing.fits")], "--sources " + str(tmp_path / "missing.fits")),
        (base + ["--sources", str(cubes / "example_a.fits")], "no table HDU (not a Tractor catalog)"),
        (["--tiles", str(cubes), "--out", str(out), "--model", "nope:"], "model 'nope:': expected NAME:TAG"),
        (["--tiles", str(cubes), "--out", str(cubes / "example_a.fits"), "--model", "tiny"], "exists and is not a store"),
        (base + ["--max-image-pixels", "0"], "--max-image-pixels must be a positive"),
    ]
    (tmp_path / "lockholder").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom galaxalign_batch import lease as lock\n"
                               "lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cases.append((base, "is being written by another run"))
        for args, message in cases:
            last, err = _preflight(*args)
            assert last == "rc 1 ray-imported False", (args, last, err)
            assert len(err) == 1 and message in err[0], (args, err)
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------- image size

def _huge_cube(path) -> None:
    """A FITS cube whose header declares 3 x 30000 x 30000 float32 (10.8 GB; a sparse file on disk)."""
    from astropy.io import fits

    h = fits.Header()
    for k, v in (("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 3), ("NAXIS1", 30000), ("NAXIS2", 30000),
                 ("NAXIS3", 3)):
        h[k] = v
    head = h.tostring().encode()
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + -(-3 * 30000 * 30000 * 4 // 2880) * 2880)


READ_HUGE = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a 10 GiB allocation would fail
from galaxalign_batch.errors import TileError
from galaxalign_batch.survey import open_tile
import astropy.io.fits, astropy.wcs, fitsio  # noqa: F401,E401  (the readers load these on first use: not timed)
t = time.perf_counter()
try:
    open_tile(sys.argv[1])
except TileError as e:
    print("TileError", round(time.perf_counter() - t, 3), e)
"""


def test_a_huge_declared_image_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.fits"
    _huge_cube(path)
    r = subprocess.run([sys.executable, "-c", READ_HUGE, str(path)], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("TileError"), (r.stdout, r.stderr[-2000:])
    assert "declares a 3 x 30000 x 30000 image (2,700,000,000 pixels), more than the limit" in r.stdout
    assert float(r.stdout.split()[1]) < 1.0


def test_the_image_size_limit_is_configurable_in_embed(cubes, tmp_path):
    from galaxalign_batch.engine.encoder import describe_model
    from galaxalign_batch.engine.pipeline import prepare_task

    tiles = resolve_tiles([str(cubes / "temp_small.fits")])
    summary = embed_tiles(tiles, "tiny", tmp_path / "s.zarr", batch_size=64, max_image_pixels=1000, cpu_threads=2)
    (name, reason), = summary.tiles_failed.items()
    assert "more than the limit of 1,000" in reason
    # the task body, as a Ray worker runs it for one run and then another: the limit is per run
    spec = describe_model("tiny")["cutout_spec"]
    assert "more than the limit of 1,000" in prepare_task(tiles[0], spec, "auto", 1000)[0]["error"]
    meta, pixels = prepare_task(tiles[0], spec, "auto", None)
    assert "error" not in meta and len(pixels) > 0
