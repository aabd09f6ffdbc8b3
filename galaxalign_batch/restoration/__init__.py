"""Image restoration on the foundation model: a denoising head trained on simulated noisy / clean pairs,
with and without the frozen GalaxAlign encoder's patch tokens, and classical baselines.

- :func:`draw_clean`, :func:`add_noise`, :func:`make_pairs`, :data:`LEVELS` (``pairs``): simulated pairs
  at Legacy Survey noise levels, nanomaggies (N, 3, S, S) in g, r, z.
- :class:`DenoiseHead`, :class:`HeadConfig`, :func:`denoise`, :func:`save_head`, :func:`load_head`
  (``head``); :func:`train_head`, :class:`TrainSettings` (``train``); :class:`FoundationEncoder` (``features``).
- ``baselines`` (non-local means, Gaussian, wavelet from scikit-image), ``metrics`` (PSNR, SSIM, RMSE / sigma).

See docs/restoration.md.
"""

from galaxalign_batch.restoration import baselines, metrics
from galaxalign_batch.model.tokens import FoundationEncoder
from galaxalign_batch.restoration.head import DenoiseHead, HeadConfig, denoise, load_head, read_head_info, save_head
from galaxalign_batch.restoration.pairs import LEVELS, CleanSet, Pairs, add_noise, draw_clean, make_pairs
from galaxalign_batch.restoration.train import TrainSettings, train_head

__all__ = ["LEVELS", "CleanSet", "DenoiseHead", "FoundationEncoder", "HeadConfig", "Pairs", "TrainSettings",
           "add_noise", "baselines", "denoise", "draw_clean", "load_head", "make_pairs", "metrics",
           "read_head_info", "save_head", "train_head"]
