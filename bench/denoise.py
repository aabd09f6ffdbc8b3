"""Benchmark image restoration: the denoising head (with and without the frozen GalaxAlign encoder's
patch tokens) against classical scikit-image denoisers, by PSNR / SSIM at Legacy Survey noise levels.

Data (``galaxalign_batch.restoration.pairs``): simulated galaxies (all ten classes, r 15.5-19, each
with its own seeing) convolved with the PSF, ``--stamp`` px at 0.262"/px, in nanomaggies; noise at
the simulator's nominal depth (g/r/z 24.7/24.1/23.3) shifted by a per-level offset. Training, tuning
(validation) and test stamps are different galaxies; the test galaxies are the same at every level.

Methods (all on the same noise-normalised stamps, sigma known as from the inverse variance):
noisy input; Gaussian filter (width tuned per level on the validation stamps); BayesShrink wavelet;
non-local means (h tuned per level on the validation stamps; with the known sigma, and with
``estimate_sigma`` and the same h factor); the head without foundation features (ablation); the head
with the encoder's tokens. Without ``--checkpoint`` the encoder is galaxalign-tiny with **random
weights** (torch seed 0); pass a trained GalaxAlign checkpoint (or ``foundation``: the shipped
label-free foundation, expanded) to measure what training adds.

Noise (``--noise``): ``white`` (default) or ``correlated``, the pixel-correlated noise of a resampled
coadd (``--n-exposures`` exposures, Lanczos-3 at random sub-pixel shifts, ``pairs.unit_noise``), at the
same per-pixel sigma; the heads are trained on the same noise model as the test. The results record
the test noise's measured neighbour correlation and what scikit-image's ``estimate_sigma`` reads on
the normalised noisy stamps (1 = the true sigma).

    python bench/denoise.py [--json PATH] [--checkpoint CKPT|foundation] [--steps 7200] [--n-train 600]
        [--n-test 100] [--noise white|correlated] [--n-exposures 3] [--nlm-grid 0.4,...] [--no-ablation]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from galaxalign_batch.restoration import baselines, metrics  # noqa: E402
from galaxalign_batch.model.tokens import FoundationEncoder  # noqa: E402
from galaxalign_batch.restoration.head import NORMS, denoise, load_head, save_head  # noqa: E402
from galaxalign_batch.restoration.pairs import (LEVELS, NOISE_MODELS, add_noise, draw_clean,  # noqa: E402
                                                level_offsets, pixel_correlation)
from galaxalign_batch.simulate.observing import COADD_EXPOSURES  # noqa: E402

FOUNDATION = Path(__file__).resolve().parent.parent / "galaxalign_batch" / "data" / "foundation-tiny.safetensors"
from galaxalign_batch.restoration.train import TrainSettings, train_head  # noqa: E402


def make_encoder(checkpoint: str | None) -> FoundationEncoder:
    from galaxalign_batch.model import load_checkpoint
    from galaxalign_batch.model.train import TrainConfig, build_model

    if checkpoint == "foundation":
        import tempfile

        from galaxalign_batch.model.pretrain import expand_foundation

        with tempfile.TemporaryDirectory(prefix="bench-denoise-") as tmp:
            expand_foundation(FOUNDATION, Path(tmp) / "model.safetensors")
            return FoundationEncoder.from_model(load_checkpoint(Path(tmp) / "model.safetensors"),
                                                "the shipped foundation (foundation-tiny.safetensors, expanded)")
    if checkpoint:
        return FoundationEncoder.from_model(load_checkpoint(checkpoint), str(Path(checkpoint).resolve()))
    torch.manual_seed(0)
    return FoundationEncoder.from_model(build_model(TrainConfig(data="", out="")),
                                        "galaxalign-tiny, random weights (torch seed 0)")


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--checkpoint", help="a trained GalaxAlign model file (default: random-weight galaxalign-tiny)")
    ap.add_argument("--steps", type=int, default=TrainSettings().steps,
                    help="optimizer steps of each head (default %(default)s)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--stamp", type=int, default=128)
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy 2-core machine)")
    ap.add_argument("--save-heads", help="directory for the two trained heads (.safetensors)")
    ap.add_argument("--noise", choices=NOISE_MODELS, default="white", help="noise model of training and test")
    ap.add_argument("--n-exposures", type=int, default=COADD_EXPOSURES, help="exposures per coadd (correlated)")
    ap.add_argument("--nlm-grid", default=",".join(f"{v:g}" for v in baselines.NLM_H_GRID),
                    help="NLM h factors tuned over (x sigma)")
    ap.add_argument("--gaussian-grid", default=",".join(f"{v:g}" for v in baselines.GAUSSIAN_GRID),
                    help="Gaussian filter widths tuned over (px)")
    ap.add_argument("--lr", type=float, default=TrainSettings().lr, help="peak learning rate of both heads")
    ap.add_argument("--norm", choices=NORMS, default=TrainSettings().norm,
                    help="the heads' normalisation (none: the heads before 2026-12-06)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the head without foundation features")
    ap.add_argument("--no-tokens", action="store_true", help="skip the head with the foundation's tokens")
    ap.add_argument("--extra-head", action="append", default=[], metavar="NAME=PATH",
                    help="also score a saved head (save_head / --save-heads) under NAME, e.g. one trained on "
                         "the other noise model (repeatable)")
    ap.add_argument("--no-train", action="store_true", help="train no head (score --extra-head ones only)")
    args = ap.parse_args(argv)
    nlm_grid = tuple(float(v) for v in args.nlm_grid.split(",") if v.strip())
    gaussian_grid = tuple(float(v) for v in args.gaussian_grid.split(",") if v.strip())
    torch.set_num_threads(args.threads)
    levels = [lv for lv in args.levels.split(",") if lv]
    t_start = time.perf_counter()
    res: dict = {"command": "python bench/denoise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                             "torch": torch.__version__, "torch_threads": args.threads,
                             "load_average_start": os.getloadavg()},
                 "settings": vars(args), "levels": {lv: dict(zip("grz", level_offsets(lv).tolist())) for lv in levels}}

    encoder, dt = timed(make_encoder, args.checkpoint)
    res["encoder"] = {k: v for k, v in encoder.describe().items() if k != "open_clip_config"}
    train, dt_tr = timed(draw_clean, args.n_train, stamp_size=args.stamp, seed=args.seed)
    val = draw_clean(args.n_val, stamp_size=args.stamp, seed=args.seed + 1)
    test = draw_clean(args.n_test, stamp_size=args.stamp, seed=args.seed + 2)
    res["data_seconds"] = round(dt_tr, 1)
    print(f"encoder: {res['encoder']['source']}; {args.n_train} train / {args.n_val} val / {args.n_test} test "
          f"stamps of {args.stamp} px", flush=True)

    settings = TrainSettings(steps=args.steps, seed=args.seed, noise=args.noise, n_exposures=args.n_exposures,
                             lr=args.lr, norm=args.norm)
    res["train_settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()}
    heads = {}
    variants = ((() if args.no_ablation else (("head (no features)", None),))
                + (() if args.no_tokens else (("head + GalaxAlign tokens", encoder),)))
    for name, enc in (() if args.no_train else variants):
        r = train_head(train, settings, enc)
        heads[name] = r.head
        res.setdefault("training", {})[name] = {
            "seconds": round(r.seconds, 1), "loss_first_50": float(np.mean(r.losses[:50])),
            "loss_last_50": float(np.mean(r.losses[-50:])), "kept_step": r.kept_step,
            # the curve in 100-step windows, and the worst batch after the first 100 steps (a spike)
            "loss_windows": [round(float(np.mean(r.losses[i:i + 100])), 4) for i in range(0, len(r.losses), 100)],
            "loss_max_after_100": float(np.max(r.losses[100:])) if len(r.losses) > 100 else None,
            "trainable_parameters": sum(p.numel() for p in r.head.trainable_parameters())}
        print(f"trained {name}: {r.seconds:.0f} s, loss {np.mean(r.losses[-50:]):.4f}", flush=True)
        if args.save_heads:
            save_head(r.head, Path(args.save_heads) / (("features" if enc else "no_features") + ".safetensors"))

    for item in args.extra_head:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--extra-head takes NAME=PATH, got {item!r}")
        heads[name] = load_head(path)
        res.setdefault("extra_heads", {})[name] = str(Path(path).resolve())

    res["results"] = {}
    for k, lv in enumerate(levels):
        pv = add_noise(val, lv, np.random.default_rng(np.random.SeedSequence([args.seed, 101, k])), args.noise,
                       args.n_exposures)
        pt = add_noise(test, lv, np.random.default_rng(np.random.SeedSequence([args.seed, 202, k])), args.noise,
                       args.n_exposures)
        h_best, h_scores = baselines.tune(baselines.nlm, "h_factor", nlm_grid, pv.noisy, pv.clean, pv.sigma)
        g_best, g_scores = baselines.tune(baselines.gaussian, "sigma_px", gaussian_grid,
                                          pv.noisy, pv.clean, pv.sigma)
        runs = {
            "noisy input": lambda: pt.noisy,
            f"Gaussian filter ({g_best:g} px)": lambda: baselines.gaussian(pt.noisy, pt.sigma, g_best),
            "wavelet (BayesShrink)": lambda: baselines.wavelet(pt.noisy, pt.sigma),
            f"NLM, known sigma (h = {h_best:g} sigma)": lambda: baselines.nlm(pt.noisy, pt.sigma, h_best),
            f"NLM, estimated sigma (h = {h_best:g} sigma)":
                lambda: baselines.nlm(pt.noisy, pt.sigma, h_best, sigma_mode="estimated"),
            **{name: (lambda head=head: denoise(head, pt.noisy, pt.sigma)) for name, head in heads.items()},
        }
        unit = (pt.noisy - pt.clean) / pt.sigma[:, :, None, None]
        noise_stats = {"std": float(unit.std()), "corr_01": pixel_correlation(unit, (0, 1)),
                       "corr_10": pixel_correlation(unit, (1, 0)), "corr_11": pixel_correlation(unit, (1, 1)),
                       "corr_02": pixel_correlation(unit, (0, 2)),
                       "estimate_sigma_over_true": _estimated_sigma_ratio(pt.noisy, pt.sigma)}
        print(f"{lv:>20s}  test noise: " + ", ".join(f"{a} {b:.3f}" for a, b in noise_stats.items()), flush=True)
        out = {"depth": dict(zip("grz", np.round(pt.depth[0], 3).tolist())), "noise": noise_stats,
               "sigma_median": dict(zip("grz", np.median(pt.sigma, axis=0).tolist())),
               "nlm_tuning": h_scores, "gaussian_tuning": g_scores, "methods": {}}
        for name, fn in runs.items():
            est, dt = timed(fn)
            m = metrics.summary(pt.clean, est, pt.sigma)
            m["seconds_per_stamp"] = dt / len(pt)
            out["methods"][name] = m
            print(f"{lv:>20s}  {name:42s} PSNR {m['psnr']:6.2f}  SSIM {m['ssim']:.4f}  "
                  f"RMSE/sigma {m['rmse_sigma']:.3f}  {1000 * dt / len(pt):7.1f} ms/stamp", flush=True)
        res["results"][lv] = out
    res["machine"]["load_average_end"] = os.getloadavg()
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def _estimated_sigma_ratio(noisy: np.ndarray, sigma: np.ndarray) -> float:
    """Mean over stamps of scikit-image's ``estimate_sigma`` of the noise-normalised stamp (as the NLM
    baseline's "estimated" mode reads it): 1 means it reads the true sigma."""
    from skimage.restoration import estimate_sigma

    return float(np.mean([np.mean(estimate_sigma(x / s[:, None, None], channel_axis=0))
                          for x, s in zip(noisy.astype(np.float64), sigma)]))


def _key(name: str) -> str:
    """A method's name without its tuned parameter (which differs per level)."""
    return name.split(" (")[0] if name.startswith(("NLM", "Gaussian")) else name


def markdown(res: dict) -> str:
    levels = list(res["results"])
    rows = ["| method | " + " | ".join(f"{lv} PSNR / SSIM / RMSE/σ" for lv in levels) + " |",
            "|---|" + "---:|" * len(levels)]
    keys = list(dict.fromkeys(_key(n) for lv in levels for n in res["results"][lv]["methods"]))
    for key in keys:
        cells = []
        for lv in levels:
            m = next(v for n, v in res["results"][lv]["methods"].items() if _key(n) == key)
            cells.append(f"{m['psnr']:.2f} / {m['ssim']:.4f} / {m['rmse_sigma']:.3f}")
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
