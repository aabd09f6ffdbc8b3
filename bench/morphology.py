"""Morphological parameters on a simulated survey: statmorph vs the simulator's truth, and regression heads.

1. simulates ``--bricks`` bricks of ``--size`` px (fixed ``--seed``);
2. embeds every Tractor source with the engine (``galaxalign_batch.engine.embed_tiles``, local Ray):
   with ``--checkpoint CKPT`` that GalaxAlign checkpoint; **without it the ``tiny`` model with random
   weights** (self-contained, no training; the output says so);
3. measures ``--max-sources`` store rows (a random subset, fixed seed; all when fewer) with statmorph
   (``galaxalign_batch.morphology``, ``--workers`` processes), timing each source;
4. compares statmorph's Sersic index and circularised Sersic half-light radius with the truth
   (``true_sersic``, ``true_r_half``), by class group, true magnitude and S/N per pixel;
5. fits regression heads (ridge, MLP) from the embeddings to the statmorph parameters of the
   galaxies, 5-fold cross-validated (R^2, RMS, NMAD), and compares the heads' out-of-fold
   Sersic index / radius with the truth; also heads trained on the truth itself (all store galaxies).

    python bench/morphology.py [--json PATH] [--checkpoint CKPT] [--bricks 2] [--size 1024] [--seed 0]
                               [--max-sources 200] [--workers 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np  # noqa: E402

MAG_EDGES = (15.5, 16.5, 17.5, 18.5, 19.01)
SN_EDGES = (0.0, 5.0, 10.0, 20.0, 1e9)


def rows_of(t):
    out = []
    for row in t:
        d = {}
        for k, v in zip(t.colnames, row):
            if isinstance(v, (np.floating, float)):
                d[k] = None if not np.isfinite(v) else float(v)
            elif isinstance(v, np.integer):
                d[k] = int(v)
            else:
                d[k] = str(v)
        out.append(d)
    return out


def show(title: str, table) -> None:
    print(f"\n{title}")
    print("\n".join(table.pformat(max_lines=-1, max_width=-1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--checkpoint", help="GalaxAlign checkpoint to embed with (default: tiny, random weights)")
    ap.add_argument("--bricks", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-sources", type=int, default=200, help="store rows measured with statmorph")
    ap.add_argument("--workers", type=int, default=2, help="statmorph processes")
    ap.add_argument("--data", help="work folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--measurements", help="reuse this morphology table (written by an earlier run on the same "
                                           "--data as DATA/morphology.parquet) instead of measuring again")
    args = ap.parse_args(argv)

    import ray
    from astropy.table import Table, join

    from galaxalign_batch.engine import embed_tiles
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.morphology import regress, validate
    from galaxalign_batch.morphology.catalog import jobs_from_store, measure_jobs, read_table, write_table
    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.store import open_store

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="galaxalign-bench-morphology-")
        work = Path(tmp.name)
    else:
        work = Path(args.data)
        work.mkdir(parents=True, exist_ok=True)
    out: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
                 "timings_s": {}}
    t_all = time.perf_counter()

    # 1. survey
    t0 = time.perf_counter()
    root = work / "sim"
    sim = simulate_survey(root, bricks=args.bricks, size=args.size, seed=args.seed, workers=min(2, os.cpu_count() or 1))
    out["timings_s"]["simulate"] = time.perf_counter() - t0
    out["simulation"] = {"bricks": args.bricks, "size": args.size, "seed": args.seed, "galaxies": sim["n_galaxies"],
                         "stars": sim["n_stars"]}
    print(f"simulated {args.bricks} bricks of {args.size} px: {sim['n_galaxies']} galaxies, {sim['n_stars']} stars")

    # 2. embed
    model = args.checkpoint or "tiny"
    note = (f"embeddings: checkpoint {args.checkpoint}" if args.checkpoint else
            "embeddings: the 'tiny' model with RANDOM weights (no --checkpoint: self-contained, untrained)")
    print(note)
    out["embedding_model"] = note
    # with --data, a finished store of the same model is reused (embed resumes and finds every tile done)
    store_path = work / (f"store-{Path(args.checkpoint).stem}.zarr" if args.checkpoint else "store-tiny.zarr")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    try:
        embed_tiles(resolve_tiles([str(root)]), model, store_path, batch_size=64)
    finally:
        ray.shutdown()
    out["timings_s"]["embed"] = time.perf_counter() - t0
    store = open_store(store_path)
    print(f"store: {store.n_rows} rows, D = {store.dim} ({out['timings_s']['embed']:.0f} s)")

    # 3. statmorph on a subset of rows
    rng = np.random.default_rng(args.seed)
    n = store.n_rows
    rows = np.sort(rng.choice(n, min(args.max_sources, n), replace=False))
    t0 = time.perf_counter()
    if args.measurements:
        table = read_table(args.measurements)
        wall = float(table.meta.get("morphology", {}).get("wall_seconds", np.nan))
        print(f"statmorph: reusing {args.measurements} ({len(table)} rows)")
    else:
        table = measure_jobs(jobs_from_store(store, [str(root)], rows=rows), workers=args.workers)
        wall = time.perf_counter() - t0
        table.meta["morphology"]["wall_seconds"] = wall
        write_table(table, work / "morphology.parquet")
    out["measurements_reused"] = bool(args.measurements)
    sec = np.asarray(table["seconds"], np.float64)
    out["timings_s"]["statmorph_reused" if args.measurements else "statmorph"] = wall  # reused: not in the total
    out["statmorph_per_source_s"] = {"mean": float(sec.mean()), "median": float(np.median(sec)),
                                     "p90": float(np.percentile(sec, 90)), "max": float(sec.max()),
                                     "sources": len(table), "workers": args.workers,
                                     "wall_per_source": wall / len(table)}
    flags = {int(k): int(v) for k, v in zip(*np.unique(np.asarray(table["flag"]), return_counts=True))}
    out["flags"] = flags
    out["flag_sersic"] = {int(k): int(v) for k, v in zip(*np.unique(np.asarray(table["flag_sersic"]),
                                                                     return_counts=True))}
    print(f"statmorph: {len(table)} sources in {wall:.0f} s with {args.workers} workers; per source in a worker "
          f"mean {sec.mean():.2f} s, median {np.median(sec):.2f} s, p90 {np.percentile(sec, 90):.2f} s; "
          f"flags {flags}, flag_sersic {out['flag_sersic']}")

    # 4. statmorph vs truth
    truth = validate.truth_table([str(root)])
    m = join(table, truth, keys="object_id", join_type="inner")
    key = np.asarray(m["true_class_key"]).astype(str)
    galaxy = key != "star"
    single = np.isin(key, validate.SINGLE_SERSIC_CLASSES)
    good = (np.asarray(m["flag"]) == 0) & (np.asarray(m["flag_sersic"]) == 0)
    out["measured"] = {"galaxies": int(galaxy.sum()), "stars": int((~galaxy).sum()),
                       "galaxies_flag0_sersic0": int((galaxy & good).sum()),
                       "single_sersic_flag0_sersic0": int((single & good).sum())}
    vs_truth = {}
    for group, sel in (("single-Sersic classes", single & good), ("composite classes", galaxy & ~single & good)):
        for what, col, tcol in (("Sersic n", "sersic_n", "true_sersic"), ("r_half", "sersic_rhalf_circ", "true_r_half"),
                                ("r_half (non-parametric rhalf_circ)", "rhalf_circ", "true_r_half")):
            for by, edges, lab in (("true_mag_r", MAG_EDGES, "true_mag_r"), ("sn_per_pixel", SN_EDGES, "sn_per_pixel")):
                if what.startswith("r_half (non") and by == "sn_per_pixel":
                    continue
                t = validate.compare(np.asarray(m[col])[sel], np.asarray(m[tcol])[sel],
                                     np.asarray(m[by])[sel], edges, label=lab)
                title = f"statmorph {what} vs truth, {group} (flag 0, flag_sersic 0), by {lab}"
                show(title, t)
                vs_truth[title] = rows_of(t)
    out["statmorph_vs_truth"] = vs_truth

    # 5. regression heads
    x, found = regress.store_embeddings(store, m["object_id"])
    assert found.all()
    heads = {}
    for method in regress.METHODS:
        t0 = time.perf_counter()
        cv = regress.cross_validate(x, m, method=method, rows=galaxy, seed=args.seed)
        print()
        print("\n".join(cv.lines()))
        entry = {"scores": rows_of(cv.scores), "seconds": time.perf_counter() - t0}
        for what, col, tcol in (("Sersic n", "sersic_n", "true_sersic"),
                                ("r_half", "sersic_rhalf_circ", "true_r_half")):
            sel = single & np.isfinite(cv.predictions[col])
            t = validate.compare(cv.predictions[col][sel], np.asarray(m[tcol])[sel], np.asarray(m["true_mag_r"])[sel],
                                 MAG_EDGES, label="true_mag_r")
            title = f"{method} head (trained on statmorph {col}) vs truth, single-Sersic classes"
            show(title, t)
            entry[title] = rows_of(t)
        heads[method] = entry
    # heads trained on the truth itself, on every store galaxy (what the embeddings know)
    ids_all = np.asarray(store.read("object_id")).astype(object).astype(str)
    tt = join(truth, Table({"object_id": ids_all}), keys="object_id")
    tt = tt[np.asarray(tt["true_class_key"]).astype(str) != "star"]
    xt, _ = regress.store_embeddings(store, tt["object_id"])
    for method in regress.METHODS:
        cv = regress.cross_validate(xt, tt, ("true_sersic", "true_r_half"), method=method, seed=args.seed)
        print()
        print(f"{method} head trained on the truth (all {len(tt)} store galaxies):")
        print("\n".join(cv.lines()[1:]))
        heads[method]["trained_on_truth"] = rows_of(cv.scores)
        sgl = np.isin(np.asarray(tt["true_class_key"]).astype(str), validate.SINGLE_SERSIC_CLASSES)
        for col in ("true_sersic", "true_r_half"):
            t = validate.compare(cv.predictions[col][sgl], np.asarray(tt[col])[sgl], label="single-Sersic")
            heads[method][f"trained_on_truth {col} single-Sersic"] = rows_of(t)
            show(f"{method} head trained on truth: {col}, single-Sersic classes", t)
    out["heads"] = heads
    out["timings_s"]["total"] = time.perf_counter() - t_all
    out["machine"]["load_average_end"] = os.getloadavg()
    timings = {k: round(v, 1) for k, v in out["timings_s"].items()}
    print(f"\ntotal {out['timings_s']['total']:.0f} s; timings {json.dumps(timings)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
        print(f"figures written to {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
