"""Learned detection (issue 16): the detection head on the frozen foundation vs the Faster R-CNN baseline
vs sep, on the same held-out simulated fields. Called by ``bench/detection.py --learned`` (see there).

Data: ``--data`` holds a simulated survey of ``--bricks`` (7) bricks of 2048 px (seed ``--sim-seed``,
made if missing). Fields of ``--field`` px (128) are cut from every brick (``detection.fields``);
the held-out set is ``--test-fields`` (200) fields drawn (seed 0) from the last brick, the training
pool the fields of the other bricks in a seeded order (seed 0); a training set of N fields is the
first N of that order (100 in 300 in 1,000).

Runs: for each model of ``--models`` (``head``: the detection head with foundation features,
``pixels``: the same head without them, ``rcnn``: Faster R-CNN ResNet-50-FPN from random weights),
each N of ``--train-sizes`` and each seed of ``--seeds``: train ``--steps`` steps of ``--batch-size``
fields, or ``--epochs`` passes over the N fields (the same rule and the same batches for every model;
``--precision bf16``: forward passes under bf16 autocast), predict the held-out fields, evaluate
(``--eval-every K``: also every K steps, a learning curve recorded in the run's file).
Each run writes ``WORK/runs/MODEL-N-sSEED.json`` (metrics, per-step losses, seconds) and is skipped
when that file exists, so several processes (one per model) can share the work; ``--report`` reads
them all, adds sep on the same fields and the head on the real DECaLS cubes, and prints the tables.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from _machine import cpu_model

MODELS = ("head", "pixels", "rcnn")
LABEL = {"head": "detection head (foundation tokens)", "pixels": "head without foundation (ablation)",
         "rcnn": "Faster R-CNN R50-FPN (random init)", "sep": "sep (survey.detect_sources)"}


def machine() -> dict:
    import platform

    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}


def prepare(args) -> tuple:
    from galaxalign_batch.detection.fields import FieldSet, cut_fields
    from galaxalign_batch.simulate import simulate_survey
    from galaxalign_batch.survey import layout

    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    root = Path(args.data)
    if not (root / "survey-bricks.fits.gz").exists() and not (root / "simulation.json").exists():
        t0 = time.perf_counter()
        simulate_survey(root, bricks=args.bricks, size=args.size, seed=args.sim_seed, workers=2)
        print(f"simulated {args.bricks} bricks of {args.size} px in {time.perf_counter() - t0:.0f} s")
    bricks = layout.list_bricks(root)
    train_path, test_path = work / f"train-{args.field}.npz", work / f"test-{args.field}.npz"
    if train_path.exists() and test_path.exists():
        return FieldSet.load(train_path), FieldSet.load(test_path), bricks
    test = cut_fields(root, bricks[-1:], size=args.field)
    rng = np.random.default_rng(0)
    test = test.subset(np.sort(rng.choice(len(test), min(args.test_fields, len(test)), replace=False)))
    pool = cut_fields(root, bricks[:-1], size=args.field)
    order = np.random.default_rng(0).permutation(len(pool))[:max(args.train_sizes)]
    train = pool.subset(order)
    train.save(train_path)
    test.save(test_path)
    print(f"fields: {len(pool)} training fields available from {len(bricks) - 1} bricks, "
          f"{len(test)} held-out from {bricks[-1]}")
    return train, test, bricks


def run_one(model: str, n: int, seed: int, train, test, args, encoder) -> dict:
    import torch

    from galaxalign_batch.detection import head as H
    from galaxalign_batch.detection import rcnn as R
    from galaxalign_batch.detection.evaluate import evaluate
    from galaxalign_batch.detection.files import save_detector
    from galaxalign_batch.detection.train import DetectTrainSettings, steps_for_epochs, train_detector

    sub = train.subset(np.arange(n))
    steps = steps_for_epochs(args.epochs, n, args.batch_size) if args.epochs else args.steps
    s = DetectTrainSettings(steps=steps, batch_size=args.batch_size, seed=seed, features=model != "pixels",
                            precision=args.precision)

    def predict(m):
        return (R.predict(m, test.images, test.sigma) if model == "rcnn"
                else H.predict(m, test.images, test.sigma))

    curve = []

    def on_step(done, m):
        # the held-out AP50 / F1 along the run (a learning curve; nothing is chosen with it)
        if done % args.eval_every == 0 and done < steps:
            t1 = time.perf_counter()
            b = evaluate(predict(m), test, score_threshold=args.score)["box"]
            curve.append({"step": done, "ap50": b["ap"], "f1": b["f1"], "seconds": time.perf_counter() - t1})
            print(f"  {model} N={n} seed {seed} step {done}/{steps}: AP50 {b['ap']:.3f} F1 {b['f1']:.3f}", flush=True)

    res = train_detector("rcnn" if model == "rcnn" else "head", sub, s, encoder=encoder, progress=False,
                         on_step=on_step if args.eval_every else None)
    eval_seconds = sum(c["seconds"] for c in curve)
    t0 = time.perf_counter()
    preds = predict(res.model)
    predict_s = time.perf_counter() - t0
    ev = evaluate(preds, test, score_threshold=args.score)
    curve.append({"step": steps, "ap50": ev["box"]["ap"], "f1": ev["box"]["f1"], "seconds": predict_s})
    if n == max(args.train_sizes):
        save_detector(res.model, Path(args.work) / f"{model}-{n}-s{seed}.safetensors",
                      {"training": res.record(sub, s)})
    return {"model": model, "train_fields": n, "seed": seed, "steps": steps, "epochs": steps * args.batch_size / n,
            "batch_size": args.batch_size, "precision": args.precision,
            "lr": s.rcnn_lr if model == "rcnn" else s.lr, "train_seconds": res.seconds - eval_seconds,
            "token_seconds": res.token_seconds,
            "seconds_per_step": (res.seconds - eval_seconds - res.token_seconds) / steps, "curve": curve,
            "predict_seconds": predict_s, "losses": res.losses, "loss_parts_last": res.parts[-1],
            "parameters": sum(p.numel() for p in (res.model.trainable_parameters() if model != "rcnn"
                                                   else res.model.parameters())),
            "box": ev["box"], "position": ev["position"], "position_lines": ev["position_lines"],
            "machine": machine(), "torch_threads": torch.get_num_threads()}


def train_runs(args) -> None:
    import torch

    from galaxalign_batch.model.tokens import load_token_encoder

    torch.set_num_threads(args.threads)
    train, test, _ = prepare(args)
    encoder = load_token_encoder(args.model) if any(m == "head" for m in args.models) else None
    for model in args.models:
        for n in args.train_sizes:
            for seed in args.seeds:
                out = Path(args.work) / "runs" / f"{model}-{n}-s{seed}.json"
                claim = out.with_suffix(".running")
                if out.exists() or claim.exists():      # done, or another process is on it
                    continue
                claim.write_text(str(os.getpid()))
                t0 = time.perf_counter()
                rec = run_one(model, n, seed, train, test, args, encoder)
                rec["command"] = args.command_line
                rec["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                out.write_text(json.dumps(rec, default=float))
                claim.unlink()
                b = rec["box"]
                print(f"{model} N={n} seed {seed}: P {b['precision']:.3f} R {b['recall']:.3f} F1 {b['f1']:.3f} "
                      f"AP50 {b['ap']:.3f}; {time.perf_counter() - t0:.0f} s "
                      f"({rec['seconds_per_step']:.2f} s/step)", flush=True)


def sep_run(args, test) -> dict:
    from galaxalign_batch.detection.evaluate import evaluate, sep_predictions

    out = Path(args.work) / "runs" / "sep.json"
    if out.exists():
        return json.loads(out.read_text())
    preds, seconds = sep_predictions(test, args.data)
    ev = evaluate(preds, test, score_threshold=-np.inf)
    rec = {"model": "sep", "box": ev["box"], "position": ev["position"], "position_lines": ev["position_lines"],
           "detect_seconds_whole_brick": seconds}
    out.write_text(json.dumps(rec, default=float))
    return rec


def real_cubes(args) -> list[dict]:
    """The 1,000-field detectors on the real DECaLS cubes of tests/data: no truth exists, so what is reported
    is the number of detections and whether one lies at the cube's centre (the target galaxy)."""
    from galaxalign_batch.detection.apply import detect_tile
    from galaxalign_batch.detection.files import load_detector
    from galaxalign_batch.survey import open_tile

    data = Path(__file__).resolve().parent.parent / "tests" / "data" / "decals_cutouts"
    names = ["temp_small.fits", "example_a.fits", "example_b.fits", "example_c.fits.gz", "example_e.fits.gz"]
    rows = []
    n = max(args.train_sizes)
    for model in args.models:
        path = Path(args.work) / f"{model}-{n}-s{args.seeds[0]}.safetensors"
        if not path.exists():
            continue
        det = load_detector(path)
        for name in names:
            tile = open_tile(str(data / name))
            t, info = detect_tile(det, tile, min_score=args.score)
            h, w = tile.shape
            cx, cy = (w - 1) / 2, (h - 1) / 2
            d = np.hypot(np.asarray(t["x"]) - cx, np.asarray(t["y"]) - cy) * tile.pixscale
            k = int(np.argmin(d)) if len(d) else -1
            rows.append({"model": model, "cube": name, "pixscale": round(tile.pixscale, 4),
                         "size_arcsec": round(w * tile.pixscale, 1), "detections": len(t),
                         "nearest_to_centre_arcsec": float(d[k]) if k >= 0 else None,
                         "its_score": float(t["score"][k]) if k >= 0 else None,
                         "its_box_arcsec": (float((t["box"][k][2] - t["box"][k][0]) * tile.pixscale),
                                            float((t["box"][k][3] - t["box"][k][1]) * tile.pixscale)) if k >= 0 else None,
                         "resampled": info["resampled"]})
    return rows


THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def threshold_sweep(args, test) -> dict:
    """P / R / F1 at IoU 0.5 against the score threshold for the saved largest-N detectors (the 0.3 of the
    table is one point; the best threshold differs between detectors, and choosing it on the held-out
    fields is an oracle, reported as such)."""
    from galaxalign_batch.detection import head as H
    from galaxalign_batch.detection import rcnn as R
    from galaxalign_batch.detection.files import load_detector
    from galaxalign_batch.detection.metrics import evaluate_boxes

    t = test.truth
    tf = np.asarray(t["field"])
    truths = [(np.stack([np.asarray(t[c], np.float64)[tf == i] for c in ("x0", "y0", "x1", "y1")], 1).reshape(-1, 4),
               ~np.asarray(t["inside"], bool)[tf == i]) for i in range(len(test))]
    out = {}
    n = max(args.train_sizes)
    for model in MODELS:
        for seed in args.seeds:
            path = Path(args.work) / f"{model}-{n}-s{seed}.safetensors"
            if not path.exists():
                continue
            det = load_detector(path)
            preds = (R.predict(det, test.images, test.sigma) if model == "rcnn"
                     else H.predict(det, test.images, test.sigma))
            out[f"{model}-{n}-s{seed}"] = [{k: v for k, v in evaluate_boxes(preds, truths, score_threshold=th).items()
                                            if k != "matches"} for th in THRESHOLDS]
    return out


def whole_brick(args, brick: str) -> list[dict]:
    """The saved largest-N detectors through ``detect``'s tile path (windows, cores, NMS) on the whole held-out
    brick, against its truth with the standard rules (8" from edges and gaps not counted), and sep on it."""
    from galaxalign_batch.detection.apply import detect_tile
    from galaxalign_batch.detection.files import load_detector
    from galaxalign_batch.survey import layout, open_tile
    from galaxalign_batch.survey.detection_quality import compare_catalogs, compare_tile, counted_mask, read_reference

    tile = open_tile(args.data, brick)
    ref = read_reference(layout.tractor_path(args.data, brick), tile)
    cr = counted_mask(tile, ref["x"], ref["y"])
    out = []
    n = max(args.train_sizes)
    for model in MODELS:
        path = Path(args.work) / f"{model}-{n}-s{args.seeds[0]}.safetensors"
        if not path.exists():
            continue
        det = load_detector(path)
        t0 = time.perf_counter()
        cat, info = detect_tile(det, tile, min_score=args.score)
        sec = time.perf_counter() - t0
        rep = compare_catalogs(cat, ref, counted_detections=counted_mask(tile, cat["x"], cat["y"]), counted_reference=cr)
        out.append({"model": model, "seconds": sec, "windows": info["windows"], "totals": rep.totals,
                    "completeness": rep.as_dict()["completeness"]})
    c = compare_tile(tile, "auto")
    rep = compare_catalogs(c.detections, c.reference, counted_detections=c.counted_detections,
                           counted_reference=c.counted_reference)
    out.append({"model": "sep", "seconds": c.detect_seconds, "windows": None, "totals": rep.totals,
                "completeness": rep.as_dict()["completeness"]})
    return out


def _fmt(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def report(args) -> dict:
    _, test, _ = prepare(args)
    runs = [json.loads(p.read_text()) for p in sorted((Path(args.work) / "runs").glob("*.json")) if p.stem != "sep"]
    sep = sep_run(args, test)
    print(f"held-out: {len(test)} fields of {test.size} px, {int(np.sum(test.truth['inside']))} sources centred in "
          f"them; box metrics at IoU 0.5 (score >= {args.score} for P/R/F1; sep: all detections, ranked by flux "
          f"for AP); position completeness / purity: survey.detection_quality matching")
    head = (f"{'model':38s} {'N':>5s} {'seeds':>5s} {'P':>6s} {'R':>6s} {'F1':>6s} {'AP50':>6s} "
            f"{'compl':>6s} {'purity':>6s} {'s/step':>6s} {'steps':>6s}")
    print(head)
    table = []
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["model"], r["train_fields"]), []).append(r)
    order = {m: i for i, m in enumerate(MODELS)}
    for (model, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        def mean(f):
            v = [f(r) for r in rs]
            return float(np.mean(v)), (float(np.std(v)) if len(v) > 1 else None)
        row = {"model": model, "train_fields": n, "seeds": [r["seed"] for r in rs],
               "precision": mean(lambda r: r["box"]["precision"]), "recall": mean(lambda r: r["box"]["recall"]),
               "f1": mean(lambda r: r["box"]["f1"]), "ap50": mean(lambda r: r["box"]["ap"]),
               "completeness": mean(lambda r: r["position"]["totals"]["completeness"]),
               "purity": mean(lambda r: r["position"]["totals"]["purity"]),
               "seconds_per_step": mean(lambda r: r["seconds_per_step"]),
               "steps": rs[0]["steps"], "epochs": rs[0].get("epochs"), "autocast": rs[0].get("precision", "fp32"),
               "final_loss": mean(lambda r: float(np.mean(r["losses"][-20:])))}
        table.append(row)
        pm = lambda k: _fmt(row[k][0]) + ("" if row[k][1] is None else f"±{row[k][1]:.3f}")  # noqa: E731
        print(f"{LABEL[model]:38s} {n:5d} {len(rs):5d} {pm('precision'):>6s} {pm('recall'):>6s} {pm('f1'):>6s} "
              f"{pm('ap50'):>6s} {pm('completeness'):>6s} {pm('purity'):>6s} {row['seconds_per_step'][0]:6.2f} {row['steps']:6d}")
    b, t = sep["box"], sep["position"]["totals"]
    print(f"{LABEL['sep']:38s} {'-':>5s} {'-':>5s} {_fmt(b['precision']):>6s} {_fmt(b['recall']):>6s} "
          f"{_fmt(b['f1']):>6s} {_fmt(b['ap']):>6s} {_fmt(t['completeness']):>6s} {_fmt(t['purity']):>6s}")
    # completeness by magnitude and blended pairs at the largest N, first seed
    n = max(args.train_sizes)
    detail = {"sep": sep}
    for r in runs:
        if r["train_fields"] == n and r["seed"] == args.seeds[0]:
            detail[r["model"]] = r
    for name in [m for m in MODELS if m in detail] + ["sep"]:
        rep = detail[name]["position"]
        print(f"\n-- {LABEL[name]}" + ("" if name == "sep" else f", N = {n}, seed {args.seeds[0]}") + " --")
        print("completeness by true r magnitude (galaxies / stars):")
        for c in rep["completeness"]:
            if c["n_reference"]:
                print(f"  r {c['mag_bin']:>6s}: {c['n_detected']:4d}/{c['n_reference']:4d} = {_fmt(c['completeness'])}"
                      f"  (galaxies {_fmt(c['galaxy_completeness'])} of {c['n_galaxies']}, stars "
                      f"{_fmt(c['star_completeness'])} of {c['n_stars']})")
        print("blended pairs (both r < 21) by separation / (R1 + R2): resolved / merged / missed of n")
        for c in rep["pairs"]:
            if c["n_pairs"]:
                print(f"  {c['sep_over_R1+R2']:>7s}: {c['resolved']}/{c['merged']}/{c['missed']} of {c['n_pairs']}"
                      f" (resolved {_fmt(c['resolved_fraction'])})")
    print("\ntraining loss (mean of 10 steps at the start, 1/4, 1/2, 3/4 of the run, and the last 10):")
    for r in sorted(runs, key=lambda r: (order.get(r["model"], 9), r["train_fields"], r["seed"])):
        ls = np.asarray(r["losses"])
        pts = [ls[a:a + 10].mean() for a in sorted({0, len(ls) // 4, len(ls) // 2, 3 * len(ls) // 4})
               if a + 10 <= len(ls)] + [ls[-10:].mean()]
        print(f"  {r['model']:6s} N={r['train_fields']:4d} seed {r['seed']}: " + " -> ".join(f"{v:.3f}" for v in pts)
              + f"  ({r['steps']} steps, {r.get('epochs', float('nan')):.1f} epochs, {r.get('precision', 'fp32')}; "
              f"{r['train_seconds']:.0f} s, {r['seconds_per_step']:.2f} s/step at load "
              f"{r['machine']['load_average'][0]:.1f})")
    curves = [r for r in runs if len(r.get("curve", [])) > 1]
    if curves:
        print("\nheld-out AP50 along the run (step: AP50; a learning curve, nothing chosen with it):")
        for r in sorted(curves, key=lambda r: (order.get(r["model"], 9), r["train_fields"], r["seed"])):
            print(f"  {r['model']:6s} N={r['train_fields']:4d} seed {r['seed']}: "
                  + ", ".join(f"{c['step']}: {c['ap50']:.3f}" for c in r["curve"]))
    sweep = threshold_sweep(args, test)
    if sweep:
        print(f"\nF1 at IoU 0.5 against the score threshold ({', '.join(f'{v:g}' for v in THRESHOLDS)}), N = {n}:")
        for name, rows in sweep.items():
            best = max(rows, key=lambda r: r["f1"])
            print(f"  {name:16s} " + " ".join(f"{r['f1']:.3f}" for r in rows)
                  + f"  best {best['f1']:.3f} at {best['score_threshold']:g} (P {best['precision']:.3f}, "
                    f"R {best['recall']:.3f}; an oracle threshold)")
    brick = str(test.origin["brick"][0])
    wb = whole_brick(args, brick)
    print(f"\nthe whole held-out brick {brick} through detect's tile path (score >= {args.score}; sep: all), "
          "against its truth (8\" from edges / gaps not counted):")
    for r in wb:
        t = r["totals"]
        by = ", ".join(f"{c['mag_bin']} {_fmt(c['completeness'], 2)}" for c in r["completeness"] if c["n_reference"])
        print(f"  {LABEL[r['model']][:34]:34s} {t['detections']:5d} det, completeness {t['completeness']:.3f}, "
              f"purity {t['purity']:.3f} ({t['fragments']} fragments, {t['spurious']} spurious), {r['seconds']:.1f} s"
              + (f" ({r['windows']} windows)" if r["windows"] else "") + f"; by r: {by}")
    cubes = real_cubes(args)
    if cubes:
        print("\nreal DECaLS cubes (tests/data/decals_cutouts; no truth catalogue exists for them):")
        for c in cubes:
            print(f"  {LABEL[c['model']][:30]:30s} {c['cube']:18s} {c['pixscale']:.3f}\"/px {c['size_arcsec']:5.1f}\": "
                  f"{c['detections']:2d} detections; nearest to the centre {_fmt(c['nearest_to_centre_arcsec'], 2)}\" "
                  f"(score {_fmt(c['its_score'], 2)}, box {c['its_box_arcsec'] and 'x'.join(f'{v:.1f}' for v in c['its_box_arcsec'])}\")")
    return {"table": table, "sep": {"box": sep["box"], "totals": sep["position"]["totals"],
                                    "detect_seconds_whole_brick": sep["detect_seconds_whole_brick"]},
            "detail": {k: {"completeness": v["position"]["completeness"], "pairs": v["position"]["pairs"],
                           "purity": v["position"]["purity"]} for k, v in detail.items()},
            "losses": {f"{r['model']}-{r['train_fields']}-s{r['seed']}": r["losses"] for r in runs},
            "curves": {f"{r['model']}-{r['train_fields']}-s{r['seed']}": r.get("curve", []) for r in runs},
            "real_cubes": cubes, "threshold_sweep": sweep, "whole_brick": wb, "held_out_fields": len(test), "machine": machine()}
