"""Training the denoising head on simulated pairs.

A *pool* holds ``realisations`` noisy versions of every clean stamp: a random right-angle rotation /
flip, a depth offset per band drawn uniformly in ``depth_range`` (mag around the simulator's nominal
depth, + = deeper) and a noise seed (the Gaussian noise is regenerated from it when drawn: white, or
with ``noise="correlated"`` a resampled coadd's, ``pairs.unit_noise``). The
encoder tokens of each pool item's whole noisy stamp are computed once (heads with features). Each
step takes ``batch_size`` pool items and a random ``crop`` x ``crop`` window of each; the loss is the
mean squared error of the noise estimate in units of sigma (AdamW, linear warm-up, cosine decay,
gradient norm clipped at 1). Two heads trained with the same ``seed`` see exactly the same batches,
so the ablation (no foundation features) differs from the full head only by the features.
"""

from __future__ import annotations

import dataclasses

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.progress import bar
from galaxalign_batch.model.tokens import FoundationEncoder
from galaxalign_batch.restoration.head import DenoiseHead, HeadConfig
from galaxalign_batch.restoration.pairs import CleanSet, check_noise, unit_noise
from galaxalign_batch.simulate.observing import COADD_EXPOSURES

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    steps: int = 7200   # 600 (the default until 2026-12-06) left the head far from converged: bench/RESULTS.md
    batch_size: int = 8
    crop: int = 48                                  # px; 0 or >= stamp: whole stamps
    lr: float = 4e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    depth_range: tuple[float, float] = (-1.5, 1.5)  # mag around nominal, + = deeper
    width: int = 16
    feature_channels: int = 16
    norm: str = "channel"                           # HeadConfig.norm: "channel" or "none" (heads before 2026-12-06)
    realisations: int = 2                           # noisy versions of each clean stamp in the pool
    seed: int = 0
    noise: str = "white"                            # "white" or "correlated" (pairs.NOISE_MODELS)
    n_exposures: int = COADD_EXPOSURES              # exposures per coadd of the correlated noise

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.crop < 0 or self.lr <= 0 or self.realisations < 1:
            raise ConfigError(f"bad training settings: steps {self.steps}, batch_size {self.batch_size}, "
                              f"crop {self.crop}, lr {self.lr}")
        if not self.depth_range[0] <= self.depth_range[1]:
            raise ConfigError(f"depth_range must be (low, high), got {self.depth_range}")
        check_noise(self.noise, self.n_exposures)


@dataclass
class TrainResult:
    head: DenoiseHead
    losses: list[float] = field(default_factory=list)   # per step
    seconds: float = 0.0
    kept_step: int | None = None   # set when the run diverged and the weights of this step were kept instead


WINDOW = 100           # steps per window of the best-weights watch
DIVERGED_FACTOR = 2.0  # a run whose last window's loss is this many times its best window's has diverged


class BestWeights:
    """Keeps the trainable weights (everything but the frozen encoder) at the end of the window of ``WINDOW``
    steps with the lowest mean loss, and puts them back when the run ends far above it: a run can collapse to the
    no-op (measured: one head in five at 7200 steps reached a window mean of 0.29 at step 300, near the peak of
    the learning rate, then sat at the no-op's loss 1.0 from step ~600 to the end; bench/RESULTS.md, "Image restoration")."""

    def __init__(self, module: torch.nn.Module, window: int = WINDOW, factor: float = DIVERGED_FACTOR):
        self.module, self.window, self.factor = module, window, factor
        self.best, self.best_step, self.state = math.inf, None, None

    def _trainable(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items() if not k.startswith("encoder.")}

    def update(self, losses: list[float]) -> None:
        """Call after every step with the losses so far."""
        if len(losses) % self.window:
            return
        m = float(np.mean(losses[-self.window:]))
        if m < self.best:
            self.best, self.best_step, self.state = m, len(losses), self._trainable()

    def finish(self, losses: list[float]) -> int | None:
        """Put the best weights back if the run ended ``factor`` x above them; returns their step, else None."""
        if self.state is None or len(losses) < self.window:
            return None
        last = float(np.mean(losses[-self.window:]))
        if not last > self.factor * self.best:
            return None
        self.module.load_state_dict(self.state, strict=False)
        return self.best_step


class _Pool:
    """``realisations`` noisy versions of every clean stamp: a rotation / flip, a depth offset per band and a
    noise seed each; the noise is regenerated from its seed when drawn, the encoder tokens are computed once."""

    def __init__(self, clean: CleanSet, s: TrainSettings, encoder: FoundationEncoder | None):
        self.clean = clean
        self.noise, self.n_exposures = s.noise, s.n_exposures
        n, nb = clean.sigma_nominal.shape
        rng = np.random.default_rng(np.random.SeedSequence([s.seed, 23]))
        m = n * s.realisations
        self.index = np.tile(np.arange(n), s.realisations)
        self.turn = rng.integers(4, size=m)
        self.flip = rng.integers(2, size=m).astype(bool)
        off = rng.uniform(*s.depth_range, size=(m, nb))
        self.sigma = (clean.sigma_nominal[self.index] * 10.0 ** (-0.4 * off)).astype(np.float32)
        self.seeds = rng.integers(2**63, size=m)
        self.tokens = None
        if encoder is not None:
            chunks = []
            for a in range(0, m, 64):
                x, noise, sigma = self.draw(np.arange(a, min(a + 64, m)))
                chunks.append(encoder.tokens(x + noise * sigma[:, :, None, None], clean.pixscale))
            self.tokens = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.index)

    def draw(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clean stamps, unit noise, sigma) of pool items; noisy = clean + noise * sigma."""
        x = np.stack([_orient(self.clean.clean[self.index[k]], self.turn[k], self.flip[k]) for k in items])
        noise = np.stack([unit_noise(np.random.default_rng(int(self.seeds[k])), x.shape[1:], self.noise,
                                     self.n_exposures) for k in items])
        return x, noise, self.sigma[items]


def _orient(x: np.ndarray, turn: int, flip: bool) -> np.ndarray:
    a = np.rot90(x, k=int(turn), axes=(1, 2))
    return np.ascontiguousarray(a[:, :, ::-1] if flip else a)


def train_head(clean: CleanSet, settings: TrainSettings | None = None,
               encoder: FoundationEncoder | None = None) -> TrainResult:
    """Train a head (with foundation features when ``encoder`` is given) on ``clean`` stamps."""
    s = settings or TrainSettings()
    if len(clean) < 1:
        raise ConfigError("no clean stamps to train on")
    n, nb, h, w = clean.clean.shape
    crop = min(s.crop or h, h, w)
    torch.manual_seed(s.seed)
    angular = encoder.spec.angular_size if encoder is not None else 32.0
    config = HeadConfig(bands=nb, width=s.width, feature_dim=encoder.width if encoder is not None else 0,
                        feature_channels=s.feature_channels, angular_size=angular, pixscale=clean.pixscale,
                        norm=s.norm)
    head = DenoiseHead(config, encoder)
    head.training_settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()}
    params = head.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    warm = max(1, int(s.warmup * s.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / warm if k < warm else
                                              0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, s.steps - warm))))
    pool = _Pool(clean, s, encoder)
    rng = np.random.default_rng(np.random.SeedSequence([s.seed, 29]))
    result = TrainResult(head)
    watch = BestWeights(head)
    t0 = time.perf_counter()
    head.train()
    with bar(total=s.steps, desc="denoiser" + (" +features" if encoder is not None else ""), unit="step") as pbar:
        for _ in range(s.steps):
            items = rng.integers(len(pool), size=s.batch_size)
            x, noise, sigma = pool.draw(items)
            tokens = pool.tokens[items] if pool.tokens is not None else None
            oy, ox = rng.integers(h - crop + 1, size=s.batch_size), rng.integers(w - crop + 1, size=s.batch_size)
            xc = np.stack([x[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop] for i in range(s.batch_size)])
            nc = np.stack([noise[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop] for i in range(s.batch_size)])
            z = torch.from_numpy(xc / sigma[:, :, None, None] + nc)
            centre = torch.from_numpy(np.stack([(w - 1) / 2.0 - ox, (h - 1) / 2.0 - oy], axis=1)).float()
            loss = torch.mean((head(z, tokens, centre) - torch.from_numpy(nc)) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            result.losses.append(loss.item())
            watch.update(result.losses)
            pbar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            pbar.update(1)
    result.seconds = time.perf_counter() - t0
    result.kept_step = watch.finish(result.losses)
    if result.kept_step is not None:
        log.warning("the denoising head's training diverged (last %d steps' loss %.4f against %.4f at step %d): "
                    "those weights are kept; a lower lr or another seed may train further", WINDOW,
                    float(np.mean(result.losses[-WINDOW:])), watch.best, result.kept_step)
    head.eval()
    log.info("denoising head (%s features) trained: %d steps in %.1f s, last-50 loss %.4f",
             "with" if encoder is not None else "without", s.steps, result.seconds, float(np.mean(result.losses[-50:])))
    return result
