"""Benchmark the CPU cutout path: compressed bricks + catalog -> stretched, resized cutouts.

Fast path (the project's): ``survey.read_brick`` (fitsio decompression, coverage masks) +
``survey.read_tractor`` + ``preprocess.make_cutouts`` (Numba). Baseline, on the same sources and
files: fitsio reads, astropy ``Cutout2D`` per source and band (with the WCS), the legacypipe viewer
stretch in NumPy and ``skimage.transform.resize`` (anti-aliased) per source, flipped north up like the
fast path's default orientation (the pictures of the two are compared). Decompression is timed
in both. Data: simulated bricks (``galaxalign_batch.simulate.simulate_survey``) written once into a
cache directory (not timed).

    python bench/preprocess.py [--json PATH] [--bricks N] [--size PX] [--data DIR]
    python bench/preprocess.py --sections "mag_r < 19" [--density D] [--stars S]   # section vs whole-brick reads
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np

DEFAULT_DATA = Path(os.environ.get("TMPDIR", "/tmp")) / "galaxalign-bench-preprocess"


# --- data ----------------------------------------------------------------------------------------

def make_data(root: Path, bricks: int, size: int, seed: int, density: float | None,
              stars: float | None = None) -> str:
    """Simulated survey tree under ``root`` (made once; a ``.complete`` marker makes it reusable)."""
    marker = root / ".complete"
    if marker.exists():
        return marker.read_text().strip()
    root.mkdir(parents=True, exist_ok=True)
    from galaxalign_batch.simulate import simulate_survey

    t0 = time.perf_counter()
    extra = {} if density is None else {"density": density}
    if stars is not None:
        extra["stars"] = stars
    simulate_survey(root, bricks=bricks, size=size, seed=seed, workers=min(bricks, os.cpu_count() or 1), **extra)
    source = (f"galaxalign_batch.simulate.simulate_survey(bricks={bricks}, size={size}, seed={seed}"
              + "".join(f", {k}={v:g}" for k, v in extra.items()) + ")")
    marker.write_text(source + "\n")
    print(f"made data in {time.perf_counter() - t0:.1f} s: {source} -> {root}", file=sys.stderr)
    return source


class Clock:
    """Wall and process-CPU time (all threads) since the last lap."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


#: the fast and baseline pictures of one source agree at least this well when both cut the same product
MIN_CORRELATION = 0.95

# --- fast path -----------------------------------------------------------------------------------

def fast_brick(root: Path, brick: str, spec, engine_inputs: bool) -> dict:
    from galaxalign_batch.preprocess import make_cutouts
    from galaxalign_batch.survey import layout, read_brick, read_tractor

    clock = Clock()
    if engine_inputs:  # what engine.prepare reads: images + invvar + maskbits
        tile = read_brick(root, brick)
    else:
        tile = read_brick(root, brick, with_invvar=False, with_maskbits=False)
    sources = read_tractor(layout.tractor_path(root, brick), tile=tile)
    read = clock.lap()
    batch = make_cutouts(tile.image, tile.valid, np.asarray(sources["x"]), np.asarray(sources["y"]),
                         tile.pixscale, spec, bands=tile.bands)
    cut = clock.lap()
    return {"n": len(sources), "read": read, "cut": cut, "pixels": batch.pixels,
            "ids": np.asarray(sources["object_id"]).astype(str)}


# --- baseline ------------------------------------------------------------------------------------

def viewer_rgb(imgs, m=0.03, Q=20.0):
    """Legacy Survey viewer RGB (legacypipe sdss_rgb) of [g, r, z] planes, NumPy; (H, W, 3) in [0, 1]."""
    scales = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
    I = 0
    for img, band in zip(imgs, "grz"):
        I = I + np.maximum(0, img * scales[band][1] + m)
    I /= 3
    fI = np.arcsinh(Q * I) / np.sqrt(Q)
    I += (I == 0.0) * 1e-6
    I = fI / I
    rgb = np.zeros(I.shape + (3,), np.float32)
    for img, band in zip(imgs, "grz"):
        plane, scale = scales[band]
        rgb[:, :, plane] = np.clip((img * scale + m) * I, 0, 1)
    return rgb


def baseline_brick(root: Path, brick: str, spec) -> dict:
    import fitsio
    from astropy.nddata import Cutout2D
    from skimage.transform import resize

    from galaxalign_batch.survey import layout

    clock = Clock()
    planes, wcs = [], None
    for band in "grz":
        path = str(layout.image_path(root, brick, band))
        planes.append(fitsio.read(path, ext=1).astype(np.float32))
        if wcs is None:
            wcs = _wcs_of(path)
    cat = fitsio.read(str(layout.tractor_path(root, brick)), columns=["release", "brickname", "objid", "bx", "by",
                                                                       "brick_primary"], lower=True)
    cat = cat[cat["brick_primary"].astype(bool)]
    read = clock.lap()
    pixscale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
    npix = int(round(spec.angular_size / pixscale))
    # the same picture as the fast path: north up, east left from the signs of the (unrotated) CD matrix
    cd = wcs.pixel_scale_matrix
    north_up = spec.orientation == "north-up"
    flip_rows, flip_cols = north_up and cd[1, 1] > 0, north_up and cd[0, 0] > 0
    out = np.empty((len(cat), 3, spec.out_size, spec.out_size), np.float32)
    for n, (x, y) in enumerate(zip(cat["bx"], cat["by"])):
        cuts = [Cutout2D(p, (float(x), float(y)), (npix, npix), wcs=wcs, mode="partial", fill_value=0.0).data
                for p in planes]
        rgb = viewer_rgb(cuts)
        small = resize(rgb, (spec.out_size, spec.out_size, 3), anti_aliasing=True, preserve_range=True)
        if flip_rows:
            small = small[::-1]
        if flip_cols:
            small = small[:, ::-1]
        out[n] = small.transpose(2, 0, 1)
    cut = clock.lap()
    ids = np.array([f"{r}/{b.decode() if isinstance(b, bytes) else b}/{o}".replace(" ", "")
                    for r, b, o in zip(cat["release"], cat["brickname"], cat["objid"])])
    return {"n": len(cat), "read": read, "cut": cut, "pixels": out, "ids": ids}


def _wcs_of(path: str):
    """astropy WCS from the TAN keywords of a brick image header (read with fitsio)."""
    import fitsio
    from astropy.io import fits
    from astropy.wcs import WCS

    hdr = fitsio.read_header(path, ext=1)
    cards = fits.Header()
    for rec in hdr.records():
        name = rec.get("name")
        if name and name.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "CDELT", "CUNIT", "EQUINOX", "RADESYS")):
            cards[name] = rec.get("value")
    return WCS(cards, naxis=2)


# --- section reads (embed --targets / --where) ----------------------------------------------------

def sections_brick(root: Path, brick: str, spec, where: str) -> dict:
    """A cut's sources of one brick, cut twice: whole-brick read (what ``engine.prepare`` reads: images and
    invvar) and section reads of the fpack tiles the cutouts need (``survey.sections``). Wall times include
    the catalogue read and the cut; decompressed pixels are counted over all planes."""
    from galaxalign_batch.preprocess import make_cutouts
    from galaxalign_batch.survey import layout, read_brick, read_tractor
    from galaxalign_batch.survey.sections import SectionStats, brick_frame, read_brick_sections
    from galaxalign_batch.survey.where import parse_where

    cut = parse_where(where)
    cat = layout.tractor_path(root, brick)
    out = {}
    t = time.perf_counter()
    tile = read_brick(root, brick, with_maskbits=False)
    src = read_tractor(cat, tile, keep=cut.needed_columns())
    src = src[cut.evaluate(src)]
    x, y = np.asarray(src["x"], np.float64), np.asarray(src["y"], np.float64)
    whole = make_cutouts(tile.image, tile.valid, x, y, tile.pixscale, spec, bands=tile.bands, wcs=tile.wcs)
    out["whole_s"] = time.perf_counter() - t
    out["whole_pixels"] = 2 * tile.image.size  # image + invvar planes
    del tile
    t = time.perf_counter()
    frame = brick_frame({b: layout.image_path(root, brick, b) for b in layout.BANDS},
                        {b: layout.image_path(root, brick, b, "invvar") for b in layout.BANDS}, brick)
    empty = read_brick_sections(frame, np.zeros(0), np.zeros(0), spec)
    src2 = read_tractor(cat, empty, keep=cut.needed_columns())
    src2 = src2[cut.evaluate(src2)]
    stats = SectionStats()
    part = read_brick_sections(frame, np.asarray(src2["x"], np.float64), np.asarray(src2["y"], np.float64), spec,
                               stats)
    sect = make_cutouts(part.image, part.valid, np.asarray(src2["x"], np.float64), np.asarray(src2["y"], np.float64),
                        part.pixscale, spec, bands=part.bands, wcs=part.wcs)
    out["sections_s"] = time.perf_counter() - t
    out["sections_pixels"] = stats.pixels
    out["rectangles"] = stats.rectangles
    out["n"] = len(src)
    out["equal"] = bool(np.array_equal(np.asarray(src["object_id"]), np.asarray(src2["object_id"]))
                        and whole.pixels.tobytes() == sect.pixels.tobytes()
                        and whole.masked_fraction.tobytes() == sect.masked_fraction.tobytes())
    return out


def sections_main(args, root: Path, bricks: list[str], spec, source: str, argv) -> int:
    import numba

    from galaxalign_batch.preprocess import warmup

    numba.set_num_threads(1)
    warmup()
    load_before = os.getloadavg()
    sections_brick(root, bricks[0], spec, args.sections)  # imports, caches: not counted
    runs = {b: [] for b in bricks}
    for _ in range(args.repeats):
        for b in bricks:
            runs[b].append(sections_brick(root, b, spec, args.sections))
    med = {b: {k: float(np.median([r[k] for r in rs])) for k in ("whole_s", "sections_s")} for b, rs in runs.items()}
    n = sum(rs[0]["n"] for rs in runs.values())
    whole_px = sum(rs[0]["whole_pixels"] for rs in runs.values())
    sect_px = sum(rs[0]["sections_pixels"] for rs in runs.values())
    whole_s = sum(m["whole_s"] for m in med.values())
    sect_s = sum(m["sections_s"] for m in med.values())
    figures = {
        "command": "python bench/preprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "data": {"source": source, "bricks": bricks}, "where": args.sections, "spec": spec.to_dict(),
        "sources": n, "per_brick": {b: rs for b, rs in runs.items()},
        "decompressed_pixels": {"whole": whole_px, "sections": sect_px, "ratio": whole_px / max(sect_px, 1)},
        "ms_per_source": {"whole": 1e3 * whole_s / n, "sections": 1e3 * sect_s / n, "ratio": whole_s / sect_s},
        "bit_identical": all(r["equal"] for rs in runs.values() for r in rs),
        "notes": "1 Numba thread; wall time per brick is the median of --repeats; files in the OS page cache",
    }
    print(f"{cpu_model()}; load average before {load_before[0]:.2f}, after {figures['machine']['loadavg_after'][0]:.2f}; "
          f"{len(bricks)} brick(s); --where {args.sections!r}: {n} sources; cutouts {spec.angular_size:g}\" -> "
          f"{spec.out_size} px")
    print(f"decompressed pixels (image + invvar, g r z): whole {whole_px:,}, sections {sect_px:,} "
          f"({figures['decompressed_pixels']['ratio']:.1f}x fewer)")
    ms = figures["ms_per_source"]
    print(f"wall ms per source (read + catalogue + cut + cutouts): whole {ms['whole']:.2f}, sections "
          f"{ms['sections']:.2f} ({ms['ratio']:.1f}x faster); cutouts bit-identical: {figures['bit_identical']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["bit_identical"] else 1


# --- main ----------------------------------------------------------------------------------------

def summarise(runs: list[dict], threads: int) -> dict:
    """Totals over bricks; rates from wall time and per CPU-second (process time of all threads)."""
    n = sum(r["n"] for r in runs)
    out: dict = {"cutouts": n, "threads": threads}
    for k, clock in (("wall", 0), ("cpu", 1)):
        read = sum(r["read"][clock] for r in runs)
        cut = sum(r["cut"][clock] for r in runs)
        out[f"read_{k}_s"], out[f"cut_{k}_s"], out[f"total_{k}_s"] = read, cut, read + cut
        out[f"read_{k}_ms_per_cutout"] = 1e3 * read / n if n else float("nan")
        out[f"cut_{k}_ms_per_cutout"] = 1e3 * cut / n if n else float("nan")
    out["cutouts_per_s"] = n / out["total_wall_s"]
    out["cutouts_per_cpu_s"] = n / out["total_cpu_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--bricks", type=int, default=2, help="simulated bricks (default 2)")
    ap.add_argument("--size", type=int, default=3600, help="brick side in pixels (default 3600, as DR9/DR10)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--density", type=float, help="galaxies per full-brick area (default: the simulator's)")
    ap.add_argument("--data", type=Path, help=f"data cache directory (default {DEFAULT_DATA}/b<N>-s<PX>-seed<S>[-d<D>])")
    ap.add_argument("--out-size", type=int, default=64, help="cutout side in output pixels (default 64)")
    ap.add_argument("--angular-size", type=float, default=32.0, help="cutout side in arcsec (default 32)")
    ap.add_argument("--stars", type=float, help="stars per full-brick area (default: the simulator's)")
    ap.add_argument("--sections", metavar="WHERE",
                    help="instead: section reads against whole-brick reads for the sources passing this cut "
                         "(e.g. \"mag_r < 19\"): decompressed pixels and wall time per source")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of every path (the median run's figures are reported, each run's rate too; "
                         "with --sections: per brick); default 3")
    args = ap.parse_args(argv)

    import numba

    from galaxalign_batch.preprocess import CutoutSpec, warmup
    from galaxalign_batch.survey import layout

    tag = f"b{args.bricks}-s{args.size}-seed{args.seed}" + (f"-d{args.density:g}" if args.density is not None else "") \
        + (f"-st{args.stars:g}" if args.stars is not None else "")
    root = args.data or DEFAULT_DATA / tag
    source = make_data(root, args.bricks, args.size, args.seed, args.density, args.stars)
    bricks = layout.list_bricks(root)[: args.bricks]
    if not bricks:
        print(f"no bricks under {root}", file=sys.stderr)
        return 1
    spec = CutoutSpec(angular_size=args.angular_size, out_size=args.out_size)
    if args.sections:
        return sections_main(args, root, bricks, spec, source, argv)
    load_before = os.getloadavg()
    import astropy.nddata  # noqa: F401  imports are not timed (one-time per process)
    import fitsio  # noqa: F401
    import skimage.transform  # noqa: F401

    import galaxalign_batch.survey  # noqa: F401
    t0 = time.perf_counter()
    warmup()  # compile / load the Numba cache: once per process, not timed
    warm_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    all_threads = numba.get_num_threads()

    # paths interleaved brick by brick, so that a change of load on a shared machine hits all of them; the
    # whole round repeated, and each path reported by its median round (one read of one brick is noisy:
    # the system time of fresh pages varies run to run on a VM)
    paths = [("fast_1thread", 1, False), (f"fast_{all_threads}threads", all_threads, False),
             ("fast_engine_inputs_1thread", 1, True), ("baseline", 1, None)]
    rounds: dict[str, list[dict]] = {label: [] for label, _, _ in paths}
    first: dict[str, list[dict]] = {}
    for rep in range(max(1, args.repeats)):
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in paths}
        for b in bricks:
            for label, threads, engine_inputs in paths:
                numba.set_num_threads(threads)
                r = (baseline_brick(root, b, spec) if engine_inputs is None
                     else fast_brick(root, b, spec, engine_inputs))
                if rep or label not in ("fast_1thread", "baseline"):
                    r.pop("pixels")  # only the first round's pictures are compared
                runs[label].append(r)
        for label, threads, _ in paths:
            rounds[label].append(summarise(runs[label], threads))
        first = first or runs
    numba.set_num_threads(all_threads)
    results = {}
    for label, per_round in rounds.items():
        ordered = sorted(per_round, key=lambda s: s["total_wall_s"])
        results[label] = {**ordered[(len(ordered) - 1) // 2],
                          "rounds_cutouts_per_s": [s["cutouts_per_s"] for s in per_round]}
    fast_outputs = dict(zip(bricks, first["fast_1thread"]))
    base_runs = first["baseline"]

    # the two paths cut the same sources; how alike are the pictures?
    corrs = []
    for b, base in zip(bricks, base_runs):
        fast = fast_outputs[b]
        if not np.array_equal(fast["ids"], base["ids"]):
            print(f"warning: the two paths cut different sources in brick {b}", file=sys.stderr)
            continue
        for p, q in zip(fast["pixels"][::10], base["pixels"][::10]):
            corrs.append(np.corrcoef(p.ravel(), q.ravel())[0, 1])

    fast1, fastn, base = results["fast_1thread"], results[f"fast_{all_threads}threads"], results["baseline"]
    figures = {
        "command": "python bench/preprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": cores, "numba_threads": all_threads, "python": platform.python_version(),
                    "numba": numba.__version__, "numpy": np.__version__, "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "data": {"source": source, "root": str(root), "bricks": bricks, "size": args.size},
        "spec": spec.to_dict(),
        "numba_warmup_s": warm_s,
        "paths": results,
        # per core: the 1-thread fast path and the single-threaded baseline; per CPU-second is the
        # same figure measured with process time, less sensitive to other work on a shared machine
        "per_core_cutouts_per_s": {"fast": fast1["cutouts_per_s"], "baseline": base["cutouts_per_s"],
                                   "ratio": fast1["cutouts_per_s"] / base["cutouts_per_s"]},
        "per_cpu_second": {"fast": fast1["cutouts_per_cpu_s"], "baseline": base["cutouts_per_cpu_s"],
                           "ratio": fast1["cutouts_per_cpu_s"] / base["cutouts_per_cpu_s"]},
        "fast_all_threads_cutouts_per_s_per_core": fastn["cutouts_per_s"] / all_threads,
        "median_corr_fast_vs_baseline": float(np.median(corrs)) if corrs else None,
        # decompression bounds any path that reads with fitsio: baseline total / baseline read (CPU)
        "ratio_bound_same_decompression": base["total_cpu_s"] / base["read_cpu_s"],
        "read_brick_extra_cpu_ms_per_cutout": fast1["read_cpu_ms_per_cutout"] - base["read_cpu_ms_per_cutout"],
        "notes": "decompression (fitsio) included in both paths; files in the OS page cache (written before); "
                 "imports and Numba compilation (warmup) not timed; the baseline is single-threaded",
    }

    print(f"{cpu_model()}, {cores} cores, Numba threads {all_threads}; load average before {load_before[0]:.2f}, "
          f"after {figures['machine']['loadavg_after'][0]:.2f}; {len(bricks)} bricks of {args.size} px; "
          f"cutouts {spec.angular_size:g}\" -> {spec.out_size} px, {spec.stretch}, {spec.dtype}")
    print(f"{'path':27s} {'cutouts':>7s} {'read s':>7s} {'cut s':>7s} {'per s':>7s} {'per cpu-s':>9s} "
          f"{'read ms/c':>9s} {'cut ms/c':>8s}  (s: wall; ms/c: CPU-ms per cutout; the median of {max(1, args.repeats)} rounds, "
          f"each round's cutouts/s after it)")
    for label, r in results.items():
        spread = "/".join(f"{v:.0f}" for v in r["rounds_cutouts_per_s"])
        print(f"{label:27s} {r['cutouts']:7d} {r['read_wall_s']:7.2f} {r['cut_wall_s']:7.2f} {r['cutouts_per_s']:7.0f} "
              f"{r['cutouts_per_cpu_s']:9.0f} {r['read_cpu_ms_per_cutout']:9.3f} {r['cut_cpu_ms_per_cutout']:8.3f}"
              f"  rounds: {spread}")
    pc, cs = figures["per_core_cutouts_per_s"], figures["per_cpu_second"]
    print(f"per core (wall, 1 thread): fast {pc['fast']:.0f} cutouts/s, baseline {pc['baseline']:.0f}, ratio {pc['ratio']:.1f}x; "
          f"per CPU-second: fast {cs['fast']:.0f}, baseline {cs['baseline']:.0f}, ratio {cs['ratio']:.1f}x; "
          f"{all_threads} threads: {figures['fast_all_threads_cutouts_per_s_per_core']:.0f} cutouts/s per core")
    print(f"read is {base['read_cpu_s'] / base['total_cpu_s']:.0%} of the baseline's CPU time: a path that decompresses "
          f"the same way is at most {figures['ratio_bound_same_decompression']:.1f}x faster; read_brick spends "
          f"{figures['read_brick_extra_cpu_ms_per_cutout']:.2f} CPU-ms/cutout more than plain fitsio reads")
    if corrs:
        print(f"median correlation fast vs baseline pictures: {figures['median_corr_fast_vs_baseline']:.4f}")
        if figures["median_corr_fast_vs_baseline"] < MIN_CORRELATION:
            print(f"warning: the two paths' pictures differ (median correlation below {MIN_CORRELATION}): "
                  "the comparison is not like for like (orientation, stretch or centring)", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
