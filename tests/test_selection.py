"""What astronomers select: --targets (lists, brick assignment, outside list), --where, --keep-columns,
section reads (bit for bit), and the selection as part of a store's identity (issue 14)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.survey.where import parse_where

A, B = "1501p022", "1503p022"  # neighbours in RA: cells [150.0, 150.25) and [150.25, 150.5) at Dec 2.125..2.375


# --- --where ------------------------------------------------------------------------------------------

def test_where_cuts_with_magnitudes_strings_and_boolean_logic():
    t = {"TYPE": np.array(["PSF ", "EXP", "DEV", "SER"]), "flux_r": np.array([100.0, 100.0, 0.5, -1.0]),
         "shape_r": np.array([0.0, 2.0, 0.7, 1.0])}
    assert parse_where("type != 'PSF' and mag_r < 19").evaluate(t).tolist() == [False, True, False, False]
    # 22.5 - 2.5 log10(0.5) = 23.25; a negative flux has no magnitude: every comparison with it is false
    assert parse_where("mag_r > 23").evaluate(t).tolist() == [False, False, True, False]
    assert parse_where("not mag_r < 19").evaluate(t).tolist() == [False, False, True, True]
    assert parse_where("type in ('DEV', 'SER') or (shape_r >= 2 and -1 < flux_r)").evaluate(t).tolist() \
        == [False, True, True, True]
    assert parse_where("17 < mag_r <= 20").evaluate(t).tolist() == [True, True, False, False]
    assert parse_where("type not in ('PSF',)").evaluate(t).tolist() == [False, True, True, True]
    w = parse_where("type   != 'PSF'  and mag_r<19")
    assert w.text == "type != 'PSF' and mag_r < 19" and w.needed_columns() == ("type", "flux_r")


@pytest.mark.parametrize("expr, what", [
    ("__import__('os').system('true')", "function call"),
    ("open('/etc/passwd')", "function call"),
    ("type.upper == 'PSF'", "attribute"),
    ("type.upper() == 'PSF'", "function call"),
    ("flux_r[0] > 1", "subscript"),
    ("flux_r * 2 > 1", "arithmetic"),
    ("mag_g - mag_r > 0.5", "arithmetic"),
    ("(lambda: 1)() > 0", "function call"),
    ("flux_r", "bare column"),
    ("~(flux_r > 1)", "'~'"),
    ("flux_r > 1 if True else 0", "conditional"),
    ("flux_r is None", "Is"),
    ("[x for x in ()] == 1", "comprehension"),
    ("type in ('A', 'B') == 1", "chained"),
    ("flux_r in flux_g", "'in' needs"),
    ("flux_r > 1; import os", "not a valid expression"),
    ("", "empty"),
])
def test_where_refuses_anything_but_comparisons_and_boolean_logic(expr, what):
    with pytest.raises(ConfigError) as e:
        parse_where(expr)
    assert what in str(e.value) and "\n" not in str(e.value)


def test_where_errors_name_the_column_or_the_type_mismatch():
    t = {"type": np.array(["PSF"]), "flux_r": np.array([1.0])}
    with pytest.raises(ConfigError, match="no column 'shape_r'"):
        parse_where("shape_r > 1").evaluate(t)
    with pytest.raises(ConfigError, match="compares a string with a number"):
        parse_where("type > 3").evaluate(t)


# --- target lists -------------------------------------------------------------------------------------

def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_targets_csv_with_sexagesimal_and_degrees(tmp_path):
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    from galaxalign_batch.survey.targets import read_targets

    p = _write_csv(tmp_path / "t.csv", ["name", "RAJ2000", "DEJ2000", "z"], [
        ["a", "150.1", "2.2", 0.1],
        ["b", "10:00:28.6", "+02:12:21", 0.2],
        ["c", "10h00m28.6s", "-02d12m21s", 0.3],
        ["d", "10 00 28.6", "-00 30 00.0", 0.4],
        ["e", "", "", 0.5],
    ])
    t = read_targets(p, id_col="name")
    assert t.ra_col == "RAJ2000" and t.dec_col == "DEJ2000" and t.ids.tolist() == list("abcde")
    ref = SkyCoord(["10:00:28.6 +02:12:21", "10:00:28.6 -02:12:21", "10:00:28.6 -00:30:00"],
                   unit=(u.hourangle, u.deg))
    assert t.ra[0] == 150.1 and t.dec[0] == 2.2
    np.testing.assert_allclose(t.ra[1:4], ref.ra.deg, rtol=0, atol=1e-9)
    np.testing.assert_allclose(t.dec[1:4], ref.dec.deg, rtol=0, atol=1e-9)
    assert np.isnan(t.ra[4]) and t.valid.tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(t.columns["z"], [0.1, 0.2, 0.3, 0.4, 0.5])
    # the same list in degrees, found by the other usual names; no id column: row numbers
    p2 = _write_csv(tmp_path / "deg.csv", ["ra", "dec"], [[150.1, 2.2], [ref.ra.deg[0], ref.dec.deg[0]]])
    t2 = read_targets(p2)
    assert t2.ids.tolist() == ["0", "1"] and t2.sha256 != t.sha256
    np.testing.assert_allclose(t2.ra, [150.1, t.ra[1]], atol=1e-12)


def test_targets_fits_and_parquet_and_refusals(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import Table

    from galaxalign_batch.survey.targets import read_targets

    Table({"RA": [150.1, 150.2], "DEC": [2.2, 2.3], "ID": [7, 8]}).write(tmp_path / "t.fits")
    t = read_targets(tmp_path / "t.fits", id_col="ID")
    assert t.ids.tolist() == ["7", "8"] and t.ra.tolist() == [150.1, 150.2]
    pq.write_table(pa.table({"ra_deg": [150.1], "dec_deg": [2.2]}), tmp_path / "t.parquet")
    assert read_targets(tmp_path / "t.parquet").dec.tolist() == [2.2]
    dup = _write_csv(tmp_path / "dup.csv", ["id", "ra", "dec"], [["x", 1, 2], ["x", 3, 4]])
    with pytest.raises(ConfigError, match="repeats 1 id"):
        read_targets(dup, id_col="id")
    nocol = _write_csv(tmp_path / "nocol.csv", ["alpha_deg", "b"], [[1, 2]])
    with pytest.raises(ConfigError, match="no recognisable RA column"):
        read_targets(nocol)
    assert read_targets(nocol, ra_col="alpha_deg", dec_col="b").ra.tolist() == [1.0]


# --- a tree whose two bricks overlap ------------------------------------------------------------------

@pytest.fixture(scope="module")
def overlap_tree(tmp_path_factory):
    """Two simulated 600-px neighbour bricks whose images are moved (CRVAL1) so that they overlap across
    the cell boundary at RA 150.25: A covers RA 150.213..150.257, B 150.243..150.287 (Dec 2.228..2.272)."""
    import fitsio

    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.survey import layout

    root = tmp_path_factory.mktemp("overlap") / "sky"
    simulate_survey(root, bricks=[A, B], size=600, seed=5, no_coverage=0.0)
    for brick, crval in ((A, 150.235), (B, 150.265)):
        for band in layout.BANDS:
            for kind in ("image", "invvar"):
                with fitsio.FITS(str(layout.image_path(root, brick, band, kind)), "rw") as f:
                    f[1].write_key("CRVAL1", crval)
    return root


def _targets_csv(path):
    return _write_csv(path, ["name", "ra", "dec"], [
        ["in_a", "150.225", "2.25"],            # A only
        ["ov_a", "10:00:59.52", "+02:15:00.0"],  # RA 150.248: both images, cell of A
        ["ov_b", "150.252", "2.25"],            # both images, cell of B
        ["in_b", "150.28", "2.26"],             # B only
        ["off_a", "150.1", "2.25"],             # cell of A, off its (small) image
        ["far", "10.0", "-5.0"],
        ["nopos", "", ""],
    ])


def test_targets_go_to_their_primary_brick_once_and_outside_ones_are_listed(overlap_tree, tmp_path):
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.selection import make_selection
    from galaxalign_batch.survey.targets import assign_targets, read_targets

    tiles = resolve_tiles([str(overlap_tree)])
    t = read_targets(_targets_csv(tmp_path / "t.csv"), id_col="name")
    a = assign_targets(t, tiles)
    by_tile = {k.rsplit("/", 1)[1]: t.ids[v].tolist() for k, v in a.per_tile.items()}
    assert by_tile == {A: ["in_a", "ov_a"], B: ["ov_b", "in_b"]}
    assert t.ids[a.outside].tolist() == ["off_a", "far", "nopos"]
    assert a.reasons.tolist() == ["outside every tile", "outside every tile", "no valid position"]
    # without its primary brick, a target on an overlap goes to the tile that holds it
    only_b = [r for r in tiles if r.brick == B]
    a2 = assign_targets(t, only_b)
    assert t.ids[a2.per_tile[only_b[0].name]].tolist() == ["ov_a", "ov_b", "in_b"]
    sel = make_selection(tiles, tmp_path / "s.zarr", targets=str(tmp_path / "t.csv"), id_col="name")
    rows = list(csv.DictReader(open(sel.outside_file)))
    assert sel.outside_file == f"{tmp_path / 's.zarr'}.targets-outside.csv"
    assert [r["target_id"] for r in rows] == ["off_a", "far", "nopos"] and rows[2]["ra"] == ""
    assert sel.lines()[0].endswith("4 on 2 tile(s), 3 outside every tile")


# --- section reads --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def damaged_brick(tmp_path_factory):
    """A simulated 1000-px brick with coverage holes, plus, in r, a 1-px-wide snake of exact zeros (valid
    invvar) crossing 100-px tile boundaries, NaN pixels and short zero runs (< 8 px: stay valid)."""
    import fitsio

    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.simulate.fitsout import tile_size
    from galaxalign_batch.survey import layout

    root = tmp_path_factory.mktemp("sections") / "sky"
    simulate_survey(root, bricks=[A], size=1000, seed=9, no_coverage=1.0, density=300, stars=20)
    path = layout.image_path(root, A, "r")
    with fitsio.FITS(str(path)) as f:
        img, hdr = f[1].read(), f[1].read_header()
    img = img.astype(np.float32)
    img[395:405, 250] = 0.0           # 10 px down, then along a tile boundary: one region of 10 + 30 px
    img[404, 250:280] = 0.0
    img[600, 598:605] = 0.0           # 7 zeros: too small, stays valid
    img[700:703, 300:303] = np.nan
    img[810, 120:123] = 0.0           # 3 zeros beside pixels without coverage (invvar 0, image not 0):
    ivpath = layout.image_path(root, A, "r", "invvar")  # one region with them, as the coverage rule sees it
    with fitsio.FITS(str(ivpath)) as f:
        iv, ivhdr = f[1].read().astype(np.float32), f[1].read_header()
    iv[800:820, 100:120] = 0.0
    iv[810, 120:123] = 1.0
    for p, data, h, q in ((path, img, hdr, -1e-4), (ivpath, iv, ivhdr, 16.0)):
        with fitsio.FITS(str(p), "rw", clobber=True) as f:
            f.write(data, header=h, compress="RICE", tile_dims=(tile_size(1000), tile_size(1000)), qlevel=q,
                    qmethod="SUBTRACTIVE_DITHER_2", dither_seed=7)
    return root


def test_section_reads_give_the_whole_bricks_cutouts_bit_for_bit(damaged_brick):
    from galaxalign_batch.preprocess import CutoutSpec, make_cutouts
    from galaxalign_batch.survey import layout, read_brick
    from galaxalign_batch.survey.sections import SectionStats, brick_frame, read_brick_sections

    root = damaged_brick
    whole = read_brick(root, A, with_maskbits=False)
    assert not whole.valid[1, 404, 250:280].any() and whole.valid[1, 600, 598:605].all()
    assert not whole.valid[1, 810, 120:123].any() and whole.image[1, 805, 105] == 0
    # sources next to the zero snake, the NaNs, the image edge and a coverage hole, and an off-image one
    holes = np.argwhere(~whole.valid[0])
    hy, hx = holes[len(holes) // 2]
    x = np.array([262.3, 251.0, 301.7, 3.2, 990.0, float(hx), 601.4, 1500.0, 121.0, 205.0, 450.0])
    y = np.array([415.8, 380.5, 701.1, 500.0, 7.5, float(hy), 600.2, 1500.0, 811.3, 590.0, 250.0])
    frame = brick_frame({b: layout.image_path(root, A, b) for b in layout.BANDS},
                        {b: layout.image_path(root, A, b, "invvar") for b in layout.BANDS}, A)
    assert frame.tile_dims == (100, 100) and frame.shape == (1000, 1000)
    for spec in (CutoutSpec(angular_size=10.0, out_size=24), CutoutSpec(angular_size=8.0, out_size=64, dtype="float32",
                                                                        stretch="none", orientation="fits"),
                 CutoutSpec(angular_size=30.0, out_size=32)):  # a footprint reaching beyond the 100-px tiles
        stats = SectionStats()
        part = read_brick_sections(frame, x, y, spec, stats)
        if spec.angular_size < 30:
            assert stats.pixels < stats.whole_pixels / 2  # far fewer pixels decompressed
        a = make_cutouts(whole.image, whole.valid, x, y, whole.pixscale, spec, bands=whole.bands, wcs=whole.wcs)
        b = make_cutouts(part.image, part.valid, x, y, part.pixscale, spec, bands=part.bands, wcs=part.wcs)
        assert a.pixels.tobytes() == b.pixels.tobytes()
        assert a.masked_fraction.tobytes() == b.masked_fraction.tobytes()
        assert (a.masked_fraction > 0).sum() >= 3  # the damage is inside the cutouts
    # many sources: the kernel consults its 16-px invalid-pixel blocks, and the margin widens to match
    rng = np.random.default_rng(0)
    xd, yd = np.concatenate([x, rng.uniform(0, 1000, 90)]), np.concatenate([y, rng.uniform(0, 1000, 90)])
    spec = CutoutSpec(angular_size=30.0, out_size=32)
    step = spec.step(whole.pixscale)
    assert len(xd) * ((spec.out_size - 1) * step + 5) ** 2 > 1000 * 1000  # preprocess.cutouts' use_blocks
    part = read_brick_sections(frame, xd, yd, spec)
    a = make_cutouts(whole.image, whole.valid, xd, yd, whole.pixscale, spec, bands=whole.bands, wcs=whole.wcs)
    b = make_cutouts(part.image, part.valid, xd, yd, part.pixscale, spec, bands=part.bands, wcs=part.wcs)
    assert a.pixels.tobytes() == b.pixels.tobytes() and a.masked_fraction.tobytes() == b.masked_fraction.tobytes()


def test_coverage_rule_needs_the_margin(damaged_brick):
    """The margin is needed: with none, the coverage rule sees a cut zero region as small (the test can fail)."""
    from galaxalign_batch.survey import layout, read_brick
    from galaxalign_batch.survey.sections import components, coverage_section, needed_tiles

    whole = read_brick(root := damaged_brick, A, with_maskbits=False)
    import fitsio

    with fitsio.FITS(str(layout.image_path(root, A, "r"))) as f, \
            fitsio.FITS(str(layout.image_path(root, A, "r", "invvar"))) as g:
        rect = (400, 500, 270, 300)  # cuts the snake to 5 + 30 px... still >= 8
        _, ok = coverage_section(f[1][rect[0]:rect[1], rect[2]:rect[3]], g[1][rect[0]:rect[1], rect[2]:rect[3]])
        assert not ok[4, :10].any() and (ok == whole.valid[1, 400:500, 270:300]).all()
        rect = (404, 405, 276, 300)  # only 4 zeros of it left: judged valid here, invalid in the whole brick
        _, ok = coverage_section(f[1][rect[0]:rect[1], rect[2]:rect[3]], g[1][rect[0]:rect[1], rect[2]:rect[3]])
        assert ok[0, :4].all() and not whole.valid[1, 404, 276:280].any()
    tiles = needed_tiles(np.array([250.0, 460.0, 930.0]), np.array([404.0, 404.0, 990.0]), 10, (1000, 1000),
                         (100, 100))
    assert tiles == {(3, 2), (4, 2), (3, 4), (4, 4), (9, 9)}  # window 250 +- 26 px: rows 378..430, columns 224..276
    comps = components(tiles | {(4, 3)}, (1000, 1000), (100, 100))
    assert [c.runs for c in comps] == [[(300, 400, 200, 300), (300, 400, 400, 500), (400, 500, 200, 500)],
                                       [(900, 1000, 900, 1000)]]


# --- the engine -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _run(tiles_root, out, **kw):
    from galaxalign_batch.engine import embed_tiles
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.engine.selection import make_selection

    tiles = resolve_tiles([str(tiles_root)])
    sections = kw.pop("sections", "auto")
    sel = make_selection(tiles, out, sections=sections, **kw)
    return embed_tiles(tiles, "tiny", out, batch_size=64, selection=sel), sel


@pytest.mark.slow  # fast tier: make test; everything: make test-all (CI)
def test_engine_embeds_each_target_once_and_refuses_another_selection(overlap_tree, tmp_path, local_ray):
    from galaxalign_batch.store import open_store

    targets = _targets_csv(tmp_path / "t.csv")
    out = tmp_path / "t.zarr"
    summary, sel = _run(overlap_tree, out, targets=str(targets), id_col="name", sections="always")
    assert summary.ok and summary.tiles_total == 2 and summary.sources == 4
    s = open_store(out)
    assert sorted(s.read("target_id").tolist()) == ["in_a", "in_b", "ov_a", "ov_b"]
    assert sorted(s.read("object_id").tolist()) == ["target/in_a", "target/in_b", "target/ov_a", "target/ov_b"]
    tiles = dict(zip(s.read("target_id").tolist(), [t.rsplit("/", 1)[1] for t in s.read("tile").tolist()]))
    assert tiles == {"in_a": A, "ov_a": A, "ov_b": B, "in_b": B}
    ra = dict(zip(s.read("target_id").tolist(), s.read("ra").tolist()))
    assert ra["ov_b"] == 150.252 and abs(ra["ov_a"] - 150.248) < 1e-9
    assert s.attrs["selection"]["kind"] == "targets" and s.attrs["selection"]["sha256"] == sel.targets.sha256
    # whole-brick reads give the same embeddings (the cutouts are equal bit for bit)
    whole, _ = _run(overlap_tree, tmp_path / "w.zarr", targets=str(targets), id_col="name", sections="never")
    w = open_store(tmp_path / "w.zarr")
    order_s, order_w = np.argsort(s.read("target_id")), np.argsort(w.read("target_id"))
    assert np.array_equal(s.read("embedding")[order_s], w.read("embedding")[order_w])
    # the same selection resumes (nothing to do); another list, a cut or a full run are refused
    again, _ = _run(overlap_tree, out, targets=str(targets), id_col="name")
    assert again.tiles_done == 0 and again.tiles_skipped == 2
    other = _write_csv(tmp_path / "other.csv", ["name", "ra", "dec"], [["in_a", "150.225", "2.25"]])
    with pytest.raises(ConfigError, match="made from the targets file .* this run selects the targets file"):
        _run(overlap_tree, out, targets=str(other), id_col="name")
    with pytest.raises(ConfigError, match="a full run would skip them"):
        _run(overlap_tree, out)
    with pytest.raises(ConfigError, match="this run selects the cut"):
        _run(overlap_tree, out, where="mag_r < 19")
    assert open_store(out).n_rows == 4


def test_where_run_keeps_columns_and_join_outputs_them(tmp_path, local_ray):
    from galaxalign_batch.downstream.join import join_catalog
    from galaxalign_batch.engine.selection import TRACTOR_KEEP
    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.store import open_store
    from galaxalign_batch.survey import layout, read_tractor
    import pyarrow.parquet as pq

    root = tmp_path / "sky"
    simulate_survey(root, bricks=[A], size=400, seed=2, no_coverage=0.0, density=6000, stars=200)
    cut = "type != 'PSF' and mag_r < 21"
    summary, sel = _run(root, tmp_path / "cut.zarr", where=cut)
    cat = read_tractor(layout.tractor_path(root, A))
    mag = 22.5 - 2.5 * np.log10(np.where(cat["flux_r"] > 0, cat["flux_r"], np.nan))
    expected = cat[(np.asarray(cat["type"]) != "PSF") & (mag < 21)]
    assert 0 < len(expected) < len(cat)
    s = open_store(tmp_path / "cut.zarr")
    assert sorted(s.read("object_id").tolist()) == sorted(expected["object_id"].tolist())
    assert [c.name for c in s.extra_columns] == list(TRACTOR_KEEP)
    assert s.attrs["selection"] == {"kind": "where", "where": cut}
    # join by object id: the kept columns come back equal to the catalogue's
    import pyarrow as pa
    ids = expected["object_id"].tolist()
    pq.write_table(pa.table({"oid": ids + ["nope"]}), tmp_path / "ids.parquet")
    join_catalog(tmp_path / "cut.zarr", tmp_path / "ids.parquet", tmp_path / "j.parquet", on="oid")
    j = pq.read_table(tmp_path / "j.parquet").to_pydict()
    assert j["type"][:-1] == [str(v) for v in expected["type"]] and j["type"][-1] is None
    np.testing.assert_array_equal(np.array(j["flux_r"][:-1], np.float32), np.asarray(expected["flux_r"], np.float32))
    np.testing.assert_array_equal(np.array(j["shape_r"][:-1], np.float32), np.asarray(expected["shape_r"], np.float32))
    join_catalog(tmp_path / "cut.zarr", tmp_path / "ids.parquet", tmp_path / "j2.parquet", on="oid", kept=["type"])
    names = pq.read_table(tmp_path / "j2.parquet").column_names
    assert "type" in names and "flux_r" not in names
    # --keep-columns given differently on resume is refused; unknown columns are refused before Ray
    with pytest.raises(ConfigError, match="the columns are fixed when a store is made"):
        _run(root, tmp_path / "cut.zarr", where=cut, keep_columns="type")
    with pytest.raises(ConfigError, match="no per-row column 'nope'"):
        _run(root, tmp_path / "x.zarr", keep_columns="type,nope")
    with pytest.raises(ConfigError, match="no column shape_q"):
        _run(root, tmp_path / "x.zarr", where="shape_q > 1")
    # verify checks the kept columns too: a lost chunk of one is reported
    from galaxalign_batch.store.verify import verify_store

    assert verify_store(tmp_path / "cut.zarr").ok
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tmp_path / "cut.zarr", damaged)
    (damaged / "shape_r" / "c" / "0").unlink()
    assert any("array shape_r" in p.text for p in verify_store(damaged).problems)
    shutil.rmtree(tmp_path / "sky")


def test_cli_refuses_a_bad_cut_or_a_lost_target_list_before_ray(overlap_tree, tmp_path, caplog, monkeypatch):
    """One line, exit 1, no store and no Ray: a --where that is not a cut; a list with no target on a tile."""
    from galaxalign_batch.cli import main
    from galaxalign_batch.engine import pipeline

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(pipeline, "_init_ray", no_ray)

    out = tmp_path / "s.zarr"
    assert main(["embed", "--tiles", str(overlap_tree), "--model", "tiny", "--out", str(out),
                 "--where", "__import__('os').system('true')"]) == 1
    assert "a function call is not allowed" in caplog.text
    far = _write_csv(tmp_path / "far.csv", ["ra", "dec"], [["10.0", "-5.0"]])
    assert main(["embed", "--tiles", str(overlap_tree), "--model", "tiny", "--out", str(out),
                 "--targets", str(far)]) == 1
    assert "none of its 1 targets lies on a tile" in caplog.text
    assert not out.exists() and (tmp_path / "s.zarr.targets-outside.csv").exists()
