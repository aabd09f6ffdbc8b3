"""The correlated (resampled-coadd) noise model of ``restoration.pairs`` / ``simulate.observing.coadd_noise``,
measured: per-pixel sigma, pixel correlation coefficients at small lags, what scikit-image's
``estimate_sigma`` reads of it, how much more noise a PSF-matched filter leaves than for white noise of
the same per-pixel sigma (the point-source depth it costs), and the detection's own noise-correlation
factor (``survey.sources.noise_correlation``), for 1-4 exposures per coadd.

    python bench/noise_model.py [--json PATH] [--n 64] [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402


def main(argv=None) -> dict:
    from scipy import ndimage
    from skimage.restoration import estimate_sigma

    from galaxalign_batch.restoration.pairs import pixel_correlation, unit_noise
    from galaxalign_batch.simulate.observing import FWHM, PIXSCALE, Conditions, coadd_noise_correlation
    from galaxalign_batch.survey.sources import detection_kernel, noise_correlation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--n", type=int, default=64, help="noise fields per setting")
    ap.add_argument("--size", type=int, default=128, help="field side (px)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    psf = Conditions.nominal().kernels()[1]          # r band, FWHM 1.25"
    det_kernel = detection_kernel(PIXSCALE)
    lags = ((0, 1), (1, 0), (1, 1), (0, 2), (0, 3))
    rows = []
    for model, nexp in (("white", 1), ("correlated", 1), ("correlated", 2), ("correlated", 3), ("correlated", 4)):
        f = unit_noise(np.random.default_rng([args.seed, nexp]), (args.n, args.size, args.size), model, nexp)
        white = unit_noise(np.random.default_rng([args.seed, 99]), f.shape, "white")
        filt = [ndimage.convolve(x.astype(np.float64), psf, mode="wrap")[8:-8, 8:-8] for x in f]
        filt_w = [ndimage.convolve(x.astype(np.float64), psf, mode="wrap")[8:-8, 8:-8] for x in white]
        psf_ratio = float(np.std(filt) / np.std(filt_w))
        err = np.ones((args.size, args.size), np.float32)
        mask = np.zeros_like(err, dtype=bool)
        factors = [noise_correlation(x, err, mask, det_kernel, lag=det_kernel.shape[0]) for x in f[:16]]
        row = {"model": model, "n_exposures": nexp if model == "correlated" else None, "std": float(f.std()),
               **{f"corr_{dy}{dx}": pixel_correlation(f, (dy, dx)) for dy, dx in lags},
               "expected_corr_01": coadd_noise_correlation((0, 1), nexp) if model == "correlated" else 0.0,
               "estimate_sigma": float(np.mean([estimate_sigma(x) for x in f])),
               "psf_filtered_noise_ratio": psf_ratio, "point_source_depth_loss_mag": 2.5 * math.log10(psf_ratio),
               "detection_noise_correlation": float(np.mean(factors))}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
           "command": "python bench/noise_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "psf": f"r-band Moffat FWHM {FWHM['r']}\"", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
