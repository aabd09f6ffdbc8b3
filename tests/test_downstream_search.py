"""`search`: exact top-k against brute force, the query itself first, faiss indexes, image queries, bad inputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from galaxalign_batch.cli import main
from galaxalign_batch.downstream.common import QueryError
from galaxalign_batch.downstream.index import index_paths, load_index
from galaxalign_batch.downstream.search import (find_object_rows, nearest_rows, plot_grid, read_query_image,
                                                run_query, search_store)
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.store import EmbeddingStore, ModelMismatchError, open_store

MODEL = {"id": "synthetic-0", "name": "synthetic", "kind": "test"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    x = centres[rng.integers(0, 20, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _commit(store, emb, ra, dec, tile):
    m = len(emb)
    store.commit([(tile, dict(embedding=emb, object_id=np.array([f"10000/{tile}/{i}" for i in range(m)]), ra=ra,
                              dec=dec, tile=np.full(m, tile), x=np.zeros(m, np.float32), y=np.zeros(m, np.float32),
                              masked_fraction=np.zeros(m, np.float32)), "")])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    n, d = 3000, 32
    emb = _clustered(n, d)
    rng = np.random.default_rng(1)
    ra, dec = rng.uniform(150.0, 150.5, n), rng.uniform(2.0, 2.5, n)
    path = tmp_path_factory.mktemp("search") / "s.zarr"
    store = EmbeddingStore.create(path, d, attrs={"model": MODEL, "vocabulary": None, "cutout_spec": None},
                                  rows_per_chunk=256)
    for t, s in enumerate(range(0, n, 1000)):
        _commit(store, emb[s:s + 1000], ra[s:s + 1000], dec[s:s + 1000], f"brick{t}")
    store.finalize()
    return path


def test_object_query_finds_itself_first_and_matches_brute_force(synth):
    store = open_store(synth)
    emb = store.read("embedding").astype(np.float32)
    for row in (0, 1234, 2999):
        oid = str(store.read("object_id")[row])
        res = search_store(store, run_query(store, object_id=oid), k=8, index="exact")
        assert res.rows[0] == row and res.table["object_id"].iloc[0] == oid
        scores = emb @ emb[row]
        want = np.argsort(-scores, kind="stable")[:8]
        np.testing.assert_allclose(res.scores, scores[want], rtol=0, atol=1e-5)
        assert set(res.rows.tolist()) == set(want.tolist())
        assert list(res.table.columns) == ["rank", "object_id", "ra", "dec", "score", "viewer"]


def test_ids_are_found_inside_their_tile_or_by_scanning(synth):
    store = open_store(synth)
    # "10000/brick2/5" names its tile; "brick1-x" would need the full scan (absent here)
    assert find_object_rows(store, ["10000/brick2/5", "10000/brick0/999", "nope"]) == {"10000/brick2/5": 2005,
                                                                                       "10000/brick0/999": 999}


def test_near_query_and_outside_the_store(synth):
    store = open_store(synth)
    ra, dec = store.read("ra")[77], store.read("dec")[77]
    q = run_query(store, near=f"{ra + 0.5 / 3600 / np.cos(np.radians(dec))},{dec}")
    assert q.row == 77 and "0.50 arcsec" in q.note
    rows, sep = nearest_rows(store, ra, dec, 60.0)
    all_sep = np.hypot((store.read("ra") - ra) * np.cos(np.radians(dec)), store.read("dec") - dec) * 3600
    assert set(rows.tolist()) == set(np.flatnonzero(all_sep <= 60.0).tolist()) and np.all(np.diff(sep) >= 0)
    with pytest.raises(QueryError, match="no source of the store within 5 arcsec.*none within 10 arcmin"):
        run_query(store, near="10.0,-30.0")
    # a miss near the store names the nearest source and the radius that takes it
    off = 20.0 / 3600 / np.cos(np.radians(dec))
    near, far = nearest_rows(store, ra + off, dec, 600.0)
    oid = store.read("object_id", near[:1])[0]
    with pytest.raises(QueryError, match=rf"the nearest is {oid} at {far[0]:.1f} arcsec: --radius "
                                         rf"{int(np.ceil(far[0]))}arcsec takes it"):
        run_query(store, near=f"{ra + off},{dec}", radius_arcsec=far[0] / 2)
    with pytest.raises(ConfigError, match="expected RA,DEC"):
        run_query(store, near="150.1")
    with pytest.raises(ConfigError, match="Dec must be in"):
        run_query(store, near="150.1,95")


def test_unknown_object_and_bad_arguments(synth):
    store = open_store(synth)
    with pytest.raises(QueryError, match="unknown object id 'no/such/id'"):
        run_query(store, object_id="no/such/id")
    q = run_query(store, object_id="10000/brick0/3")
    everything = search_store(store, q, k=5000)          # more than there is: all rows, best first (a warning)
    assert len(everything.table) == store.n_rows and everything.scores[0] >= everything.scores[-1]
    with pytest.raises(ConfigError, match="exactly one query"):
        run_query(store, object_id="10000/brick0/3", near="1,2")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_is_built_once_beside_the_store_with_its_recall(synth, tmp_path, kind, monkeypatch):
    path = tmp_path / "s.zarr"
    shutil.copytree(synth, path)
    store = open_store(path)
    q = run_query(store, object_id="10000/brick1/17")
    res = search_store(store, q, k=10, index=kind)
    files = index_paths(store, kind)
    assert all(os.path.isfile(f) for f in files) and os.path.dirname(files[0]) == str(tmp_path)
    assert res.rows[0] == 1017
    meta = res.extra["index"]
    assert meta["recall"][str(meta["param"])]["10"] >= 0.95 and "recall@10=" in res.method
    exact = search_store(store, q, k=10, index="exact")
    assert len(set(res.rows.tolist()) & set(exact.rows.tolist())) >= 8
    # a second search loads the saved index instead of building it again
    import galaxalign_batch.downstream.index as index_mod

    monkeypatch.setattr(index_mod, "build_index", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = search_store(open_store(path), q, k=10, index=kind)
    np.testing.assert_array_equal(again.rows, res.rows)
    # more rows in the store make the index stale
    monkeypatch.undo()
    s = open_store(path, "r+")
    _commit(s, _clustered(10, 32, seed=5), np.full(10, 150.2), np.full(10, 2.2), "brick9")
    assert load_index(open_store(path), kind) is None


def test_not_an_image_and_missing_model(synth, tmp_path):
    from galaxalign_batch.preprocess import CutoutSpec

    bad = tmp_path / "galaxy.png"
    bad.write_text("this is text, not a PNG")
    with pytest.raises(QueryError, match="not an image"):
        read_query_image(bad, CutoutSpec())
    with pytest.raises(QueryError, match="image file not found"):
        read_query_image(tmp_path / "missing.png", CutoutSpec())
    with pytest.raises(ConfigError, match="--image needs --model"):
        run_query(open_store(synth), image=str(bad))


# ---------------------------------------------------------------------------------------------- a real model

@pytest.fixture(scope="module")
def cube_store(tmp_path_factory, cutouts_dir):
    """Detected sources of two real DECaLS cutout cubes, embedded with the tiny encoder (no Ray)."""
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.encoder import load_encoder
    from galaxalign_batch.engine.prepare import prepare_tile

    d = tmp_path_factory.mktemp("cubes")
    for name in ["example_a.fits", "example_b.fits"]:
        shutil.copy(cutouts_dir / name, d / name)
    enc = load_encoder("tiny")
    info = enc.describe()
    path = d / "cubes.zarr"
    store = EmbeddingStore.create(path, info["dim"], attrs={"model": info["identity"], "vocabulary": None,
                                                            "cutout_spec": info["cutout_spec"]})
    for ref in resolve_tiles([str(d)]):
        p = prepare_tile(ref, enc.spec)
        store.commit([(ref.name, dict(p.columns, embedding=enc.encode(p.pixels)), "")])
    store.finalize()
    return path


def test_image_query_of_a_stored_cutout_finds_it_and_grid_is_drawn(cube_store, tmp_path):
    from PIL import Image

    from galaxalign_batch.preprocess.pictures import to_rgb8

    store = open_store(cube_store)
    row = store.n_rows // 2
    pix = store.cutouts([row], strict=True)[row]
    png = tmp_path / "query.png"
    Image.fromarray(to_rgb8(pix)).save(png)  # north up, as a viewer shows it
    q = run_query(store, image=str(png), model="tiny")
    np.testing.assert_allclose(q.pixels, pix, atol=1 / 255 + 1e-6)  # flipped back to the store's convention
    res = search_store(store, q, k=4)
    assert res.rows[0] == row and res.scores[0] > 0.99
    out = plot_grid(store, res, tmp_path / "grid.png")
    with Image.open(out) as im:
        assert im.width > 400 and im.height > 100


def test_image_query_with_another_model_is_refused(cube_store, tmp_path):
    from galaxalign_batch.model.config import create_clip

    torch.manual_seed(1)
    model, _, _ = create_clip("galaxalign-tiny")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    png = tmp_path / "q.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    with pytest.raises(ModelMismatchError, match="store written by another model"):
        run_query(open_store(cube_store), image=str(png), model=f"galaxalign-tiny:{tmp_path / 'w.pt'}")


def test_cli_search(cube_store, tmp_path, capsys, caplog):
    store = open_store(cube_store)
    oid = str(store.read("object_id")[0])
    grid = tmp_path / "g.png"
    assert main(["--no-progress", "search", "--store", str(cube_store), "--object", oid, "-k", "3",
                 "--plot", str(grid), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert oid in out.splitlines()[3] and grid.is_file() and (tmp_path / "t.csv").is_file()
    assert main(["--no-progress", "search", "--store", str(cube_store), "--object", "nope"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "unknown object id" in errors[0]


def test_an_image_query_is_encoded_in_the_stores_precision(cube_store, monkeypatch):
    """A store made in one precision gets its image queries encoded in it (a stored cutout given back scores
    as itself); a store of several, or an older one without the attribute, leaves it to --precision auto."""
    from galaxalign_batch.downstream import search
    from galaxalign_batch.engine import encoder

    store = open_store(cube_store)
    assert "precisions" not in store.attrs and search.store_precision(store) == "auto"
    seen = []
    real = encoder.load_encoder
    monkeypatch.setattr(encoder, "load_encoder", lambda *a, **k: seen.append(k["precision"]) or real(*a, **k))
    for made, expect in ((["bf16"], "bf16"), (["fp32"], "fp32"), (["bf16", "fp32"], "auto")):
        attrs = {**store.group.attrs, "precisions": made}
        monkeypatch.setattr(type(store), "attrs", property(lambda self, a=attrs: a))
        assert search.store_precision(store) == expect
        search.QueryModels(store, "tiny").encoder()
    assert seen == ["bf16", "fp32", "auto"]


def test_a_picture_query_goes_through_embeds_picture_path(tmp_path):
    """``search --image`` cuts a picture as ``embed`` does (one resampler): the same pixels as the engine's
    for the same scale, the field cut at ``--pixscale``, and rows reversed for a legacy fits-order store."""
    from PIL import Image

    from galaxalign_batch.engine.images import scale_record
    from galaxalign_batch.preprocess import CutoutSpec
    from galaxalign_batch.preprocess.rgb import picture_pixscale, rgb_cutouts

    rng = np.random.default_rng(0)
    pic = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    pic[:10] = 255  # the top rows (north) white
    path = tmp_path / "galaxy.png"
    Image.fromarray(pic).save(path)
    spec = CutoutSpec(angular_size=32.0, out_size=32)
    for scale in (None, scale_record(0.262, None), scale_record(None, 60.0)):
        got = read_query_image(path, spec, scale)
        s = scale or {}
        want, _ = rgb_cutouts([pic], [picture_pixscale(pic.shape[:2], pixscale=s.get("pixscale"),
                                                       angular_size=s.get("angular_size"), spec=spec)], spec)
        np.testing.assert_array_equal(got, want[0])
    whole = read_query_image(path, spec)          # the longer side spans the field: rows above/below are black
    assert whole[:, 0].max() == 0 and whole[:, 16].max() > 0
    north_up = read_query_image(path, spec, scale_record(None, 120 * 0.25))
    legacy = read_query_image(path, CutoutSpec(angular_size=32.0, out_size=32, orientation="fits"),
                              scale_record(None, 120 * 0.25))
    np.testing.assert_array_equal(legacy, north_up[:, ::-1])


def test_a_decompression_bomb_is_a_one_line_error_in_search_and_embed(tmp_path, monkeypatch):
    from PIL import Image

    from galaxalign_batch.errors import TileError
    from galaxalign_batch.preprocess import CutoutSpec
    from galaxalign_batch.survey.images import read_picture

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses pictures over twice this
    with pytest.raises(TileError, match="decompression bomb"):
        read_picture(path)
    with pytest.raises(QueryError, match="not an image .*decompression bomb"):
        read_query_image(path, CutoutSpec())
