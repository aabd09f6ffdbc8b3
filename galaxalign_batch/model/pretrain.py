"""Label-free pretraining of an open_clip model on survey sources: a foundation for GalaxAlign.

What it reads: survey tiles through the same path as ``embed`` (``survey.tiles.resolve_tiles``,
``engine.prepare.read_tile``, ``survey.sources_for``, ``preprocess.make_cutouts``). Each source is
cut once per pass at 1.5x the model's angular size (same pixel scale and stretch), so that two
random **views** can be resampled from it: rotation by any angle, mirror, zoom 0.85-1.2, shift up to
1.5", Gaussian blur (seeing) 0-1 px, brightness x0.8-1.2 and pixel noise. With ``stretch_augment``
each source is also cut in those stretches and each view drawn in one of them. No class label is read
anywhere (the simulator's ``true_class*`` columns are dropped on reading).

Objective, per batch of B sources (the fused tri-modal loss of ``galaxalign_batch.ops`` with
``class_ids=None``, so only the same source is a positive):

- **image-image** (SimCLR-style): view 1 against view 2, weight ``w_ii``;
- **image-caption** (CLIP-style): each view against a caption generated from the source's Tractor
  columns (:mod:`galaxalign_batch.model.captions`), weight ``w_ic`` per view. Tiles without a
  Tractor catalogue (sources from detection) have no captions: their batches use image-image only.

Streaming: tiles are read in a seeded order, ``buffer`` sources at a time (a shuffle buffer of
whole tiles), so memory holds one buffer, never the survey.

Workers (``workers >= 1``: Ray Train, a ``torch.distributed`` group, gloo on CPU, NCCL with GPUs): each
group of tiles (``buffer`` sources per worker) is dealt out to the workers whole tiles at a time,
balanced by sources, so each worker reads and cuts only its own tiles; a step's global batch is
``workers x batch_size`` sources, contrasted with **global negatives** (every worker's views and captions
are negatives of every other's, ``galaxalign_batch.model.loss.contrastive_loss``) and the gradients are
averaged over the workers. Worker 0 writes the checkpoints and the model; a worker failure restarts the
group from the last checkpoint. One worker gives the single-process run's numbers exactly.

Resumable: every ``checkpoint_every`` steps (and at the end of each pass) a training checkpoint is
written under ``OUT/checkpoints``;
a rerun of the same command continues from the last one at the same batch, with the same data
order and augmentation (everything is seeded by position, not by history).

The result ``OUT/model.safetensors`` is an ordinary GalaxAlign checkpoint (mode ``image-text``,
``info["pretraining"]`` describing the run), so ``train --model``, ``embed --model`` and
``classify`` accept it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError, TileError
from galaxalign_batch.model import checkpoint as ckpt
from galaxalign_batch.model.captions import captions as make_captions, has_caption_columns
from galaxalign_batch.model.config import TINY, create_clip, tokenizer_for
from galaxalign_batch.model.distributed import allreduce_gradients, broadcast_parameters, mean_over_workers
from galaxalign_batch.model.loss import contrastive_loss
from galaxalign_batch.model.galaxalign import GalaxAlignModel
from galaxalign_batch.model.symbols import SymbolSet
from galaxalign_batch.preprocess import CutoutSpec, make_cutouts
from galaxalign_batch.preprocess.spec import check_stretch_augment
from galaxalign_batch.progress import bar
from galaxalign_batch.vocabulary import load_vocabulary

log = logging.getLogger(__name__)

VIEW_MARGIN = 1.5          # sources are cut at this multiple of the model's angular size
RESUME_KEYS = ("tiles", "model", "pretrained", "epochs", "batch_size", "seed", "angular_size", "stretch", "buffer",
               "weights", "galaxies_only", "stretch_augment")


@dataclass
class PretrainConfig:
    tiles: list[str]
    out: str
    model: str = TINY
    pretrained: str | None = None
    bricks: list[str] | None = None
    epochs: int = 20                      # passes over the tiles
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    weights: tuple[float, float] = (1.0, 1.0)   # (w_ii image-image, w_ic image-caption)
    temperature: float = 0.1
    angular_size: float = 32.0
    stretch: str = "lupton"
    stretch_augment: tuple[str, ...] = ()  # other stretches each view is drawn in at random (with the own one)
    buffer: int = 20000                   # sources held at once (shuffle buffer)
    galaxies_only: bool = False           # drop catalogue type PSF rows (uses the catalogue, not labels)
    max_steps: int | None = None          # stop after this many steps (quick runs); the schedule still spans epochs
    checkpoint_every: int = 200
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    resume: str = "auto"                  # auto | yes | no
    workers: int = 0                      # 0: this process; N >= 1: Ray Train data-parallel workers
    max_failures: int = 2                 # Ray Train worker-failure restarts

    def __post_init__(self) -> None:
        self.tiles = [str(t) for t in self.tiles]
        self.weights = tuple(float(w) for w in self.weights)
        self.stretch_augment = check_stretch_augment(self.stretch, self.stretch_augment)
        if len(self.weights) != 2 or min(self.weights) < 0 or max(self.weights) == 0:
            raise ConfigError(f"--weights must be two non-negative numbers w_ii,w_ic, not both 0; got {self.weights}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("--epochs must be >= 1 and --batch-size >= 2")
        if self.lr <= 0 or not 0 < self.temperature < 10:
            raise ConfigError("--lr must be > 0 and --temperature in (0, 10)")
        if self.workers < 0 or self.max_failures < 0:
            raise ConfigError(f"--workers and max_failures must be >= 0, got {self.workers}, {self.max_failures}")
        if self.resume not in ("auto", "yes", "no"):
            raise ConfigError(f"resume must be auto, yes or no, got {self.resume!r}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Chunk:
    """The sources of a group of whole tiles: wide cutouts (uint8) and captions (None without a catalogue)."""

    pixels: np.ndarray            # (N, 3, W, W) uint8, W = 1.5 x the model's input size
    captions: list[str | None]
    alternates: tuple[np.ndarray, ...] = ()   # the same cutouts in the --stretch-augment stretches

    def views_of(self, idx: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """Float [0, 1] wide cutouts of ``idx``; with alternates, each source's stretch drawn by ``rng``
        (the own one and each alternate equally likely)."""
        x = self.pixels[idx]  # a copy (fancy indexing)
        if self.alternates and rng is not None:
            pick = rng.integers(0, len(self.alternates) + 1, len(idx))
            for k, alt in enumerate(self.alternates, 1):
                x[pick == k] = alt[idx[pick == k]]
        return torch.from_numpy(x).float() / 255.0


def shard_tiles(tiles: list[int], counts: list[int], size: int) -> list[list[int]]:
    """The tiles of a chunk dealt to ``size`` workers, whole tiles, balanced by sources (largest first, to the
    least loaded worker); each worker's tiles in chunk order. One worker: the chunk as it is."""
    if size == 1:
        return [list(tiles)]
    load, dealt = [0] * size, [[] for _ in range(size)]
    for pos in sorted(range(len(tiles)), key=lambda p: (-counts[tiles[p]], p)):
        r = min(range(size), key=lambda w: (load[w], w))
        dealt[r].append(pos)
        load[r] += counts[tiles[pos]]
    return [[tiles[p] for p in sorted(ps)] for ps in dealt]


def steps_in_chunk(chunk: list[int], counts: list[int], size: int, batch_size: int) -> int:
    """Steps a chunk gives (every worker takes a batch per step: the smallest share decides)."""
    return min(sum(counts[i] for i in share) for share in shard_tiles(chunk, counts, size)) // batch_size


def wide_spec(spec: CutoutSpec) -> CutoutSpec:
    """The cutouts pretraining cuts for a model's ``spec``: ``VIEW_MARGIN`` x wider, same pixel scale, uint8."""
    return CutoutSpec(angular_size=spec.angular_size * VIEW_MARGIN, out_size=int(round(spec.out_size * VIEW_MARGIN)),
                      stretch=spec.stretch, dtype="uint8")


def epoch_order(seed: int, epoch: int, n_tiles: int) -> np.ndarray:
    """The seeded order in which an epoch reads the tiles."""
    return np.random.default_rng([seed, epoch]).permutation(n_tiles)


def planned_steps(counts: list[int], buffer: int, size: int, batch_size: int, seed: int, epochs: int) -> list[int]:
    """Steps of each epoch, as the loop takes them: each epoch's own tile order and shuffle buffers, the usable
    sources of each tile (``counts``: cutouts that survive the edge rule) and, with workers, the smallest share
    of each buffer."""
    n = len(counts)
    return [sum(steps_in_chunk(ch, counts, size, batch_size)
                for ch in plan_chunks(counts, buffer, epoch_order(seed, e, n))) for e in range(epochs)]


def plan_chunks(counts: list[int], buffer: int, order: np.ndarray) -> list[list[int]]:
    """Consecutive groups of tiles (in ``order``) holding up to ``buffer`` sources each (at least one tile)."""
    chunks, cur, n = [], [], 0
    for i in order:
        if cur and n + counts[i] > buffer:
            chunks.append(cur)
            cur, n = [], 0
        cur.append(int(i))
        n += counts[i]
    if cur:
        chunks.append(cur)
    return chunks


def _sources(ref, galaxies_only: bool):
    from galaxalign_batch.engine.prepare import read_tile
    from galaxalign_batch.survey import sources_for

    tile = read_tile(ref)
    src = sources_for(tile, catalog="auto", id_prefix=ref.name)
    for c in [c for c in src.colnames if c.startswith("true_")]:
        src.remove_column(c)  # truth of the simulator: never seen by pretraining
    if galaxies_only and "type" in src.colnames:
        kind = np.char.strip(np.asarray(src["type"]).astype(str))
        src = src[(kind != "PSF") & (kind != "DUP")]
    return tile, src


MAX_MASKED = 0.5   # a source whose cutout is this much (or more) off the image or its coverage is not used


def _cut(tile, src, spec: CutoutSpec):
    """Cutouts of ``src`` in ``spec`` and the mask of those that are used (less than ``MAX_MASKED`` masked)."""
    x, y = np.asarray(src["x"], np.float64), np.asarray(src["y"], np.float64)
    batch = make_cutouts(tile.image, tile.valid, x, y, tile.pixscale, spec, bands=tile.bands)
    return x, y, batch, np.asarray(batch.masked_fraction) < MAX_MASKED


def count_sources(refs, galaxies_only: bool, spec: CutoutSpec | None = None) -> list[int]:
    """Sources per tile (reads catalogues; tiles without one are read and detected). With ``spec``, only the
    sources that pretraining uses: those whose cutout in ``spec`` is less than half off the image or its
    coverage (tile edges, gaps), the rule of :func:`load_chunk`, so that the step plan is exact."""
    out = []
    for ref in bar(refs, total=len(refs), desc="counting sources", unit="tile"):
        try:
            tile, src = _sources(ref, galaxies_only)
            out.append(int(_cut(tile, src, spec)[3].sum()) if spec is not None and len(src) else len(src))
        except TileError as e:
            log.warning("skipping %s: %s", ref.name, e)
            out.append(0)
    return out


def load_chunk(refs, tiles: list[int], spec: CutoutSpec, galaxies_only: bool, fits,
               alt_specs: tuple[CutoutSpec, ...] = ()) -> Chunk:
    """The wide cutouts and captions of ``tiles``; ``alt_specs``: the same cutouts in other stretches."""
    pixels, caps, alts = [], [], [[] for _ in alt_specs]
    for i in tiles:
        try:
            tile, src = _sources(refs[i], galaxies_only)
        except TileError as e:
            log.warning("skipping %s: %s", refs[i].name, e)
            continue
        if not len(src):
            continue
        x, y, batch, keep = _cut(tile, src, spec)
        pixels.append(batch.pixels[keep])
        for a, alt in zip(alts, alt_specs):
            a.append(make_cutouts(tile.image, tile.valid, x, y, tile.pixscale, alt, bands=tile.bands).pixels[keep])
        if has_caption_columns(src):
            caps += [c for c, k in zip(make_captions(src, None, fits), keep) if k]
        else:
            caps += [None] * int(keep.sum())
    w = spec.out_size

    def stack(parts):
        return np.concatenate(parts) if parts else np.zeros((0, 3, w, w), np.uint8)

    return Chunk(stack(pixels), caps, tuple(stack(a) for a in alts))


# ---------------------------------------------------------------------------------------------- views

def make_views(wide: torch.Tensor, out_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Random views (N, 3, out, out) in [0, 1] of wide cutouts (N, 3, W, W) float in [0, 1] cut at
    ``VIEW_MARGIN`` x the model's angular size: rotation, mirror, zoom, shift, blur, brightness, noise."""
    n = len(wide)
    theta_r = rng.uniform(0, 2 * np.pi, n)
    zoom = np.exp(rng.uniform(np.log(0.85), np.log(1.2), n))
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-1.5, 1.5, (n, 2)) / (16.0 * VIEW_MARGIN)   # arcsec -> normalised (half-side 16" x 1.5)
    f = 1.0 / (VIEW_MARGIN * zoom)
    cos, sin = np.cos(theta_r) * f, np.sin(theta_r) * f
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * flip, -sin, shift[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * flip, cos, shift[:, 1]
    grid = F.affine_grid(torch.from_numpy(theta), [n, 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(wide, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sigma = rng.uniform(0.0, 1.0, n)
    blur = sigma > 0.3
    if blur.any():
        x[blur] = _blur(x[blur], sigma[blur])
    x = x * torch.from_numpy(rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32))
    x = x + torch.from_numpy(rng.uniform(0, 0.03, (n, 1, 1, 1)).astype(np.float32)) * \
        torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    return x.clamp(0, 1)


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    r = 2
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / torch.from_numpy(sigma.astype(np.float32))[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                        # (n, 5)
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    kx = k.repeat_interleave(c, 0)[:, None, None, :]
    ky = k.repeat_interleave(c, 0)[:, None, :, None]
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), kx, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), ky, groups=n * c)
    return y.reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------- model

def build_foundation_model(cfg: PretrainConfig) -> GalaxAlignModel:
    """A fresh open_clip model (name + tag/file, or one of our checkpoints to continue from) wrapped as an
    ``image-text`` GalaxAlign model with the galaxy10 vocabulary and the built-in symbols (so that a
    foundation can be classified zero-shot and fine-tuned like any checkpoint)."""
    from galaxalign_batch.model.spec import model_file, parse_model_spec

    vocab = load_vocabulary("galaxy10")
    model_spec = parse_model_spec(cfg.model, pretrained=cfg.pretrained)
    from_checkpoint = model_spec.kind == "checkpoint"
    if from_checkpoint:
        base = ckpt.load_checkpoint(cfg.model)
        clip, oc, pre = base.clip, dict(base.info["open_clip"]), dict(base.info["preprocess"])
    else:
        clip, oc_cfg, pre = create_clip(model_spec.name, model_spec.weights)
        oc = {"name": model_spec.name, "pretrained": model_spec.weights, "config": oc_cfg}
    spec = CutoutSpec(angular_size=cfg.angular_size, out_size=pre["size"], stretch=cfg.stretch)
    info = {"mode": "image-text", "stage": "pretrain", "open_clip": oc, "preprocess": pre,
            "cutout_spec": spec.to_dict()}
    if from_checkpoint:
        info["lineage"] = ckpt.lineage_from(base.info, model_file(cfg.model))
    model = GalaxAlignModel(clip, info, tokenizer_for(oc["name"], oc["config"]), vocab,
                            SymbolSet.builtin(vocab, pre["size"]))
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(1.0 / cfg.temperature))
        emb = getattr(model.clip, "token_embedding", None)
        if isinstance(emb, torch.nn.Embedding) and model_spec.random_weights:
            # a token embedding that can be regenerated from its seed: see export_foundation
            emb.weight.copy_(seeded_token_embedding(tuple(emb.weight.shape), cfg.seed))
    return model


TOKEN_INIT_STD = 0.02   # open_clip's init of the token embedding


def seeded_token_embedding(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """N(0, 0.02) token embedding from a seed alone (CPU generator), as pretraining starts it."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randn(shape, generator=g, dtype=torch.float32) * TOKEN_INIT_STD


# ---------------------------------------------------------------------------------------------- the loop

def pretrain(cfg: PretrainConfig, *, force_unlock: bool = False) -> dict:
    """Run (or resume) a pretraining, in this process or on ``cfg.workers`` Ray Train workers; returns a summary
    and writes ``OUT/model.safetensors``.

    The run holds the lease of ``cfg.out`` (:mod:`galaxalign_batch.lease`) throughout, as ``train`` does.
    """
    with lease.locked(cfg.out, force=force_unlock):
        ckpt.clear_leftovers(Path(cfg.out))
        if cfg.workers >= 1:
            return _pretrain_on_workers(cfg)
        return _pretrain(cfg)


RAY_RUN_NAME = "pretrain"


def _pretrain_on_workers(cfg: PretrainConfig) -> dict:
    """``cfg`` on ``cfg.workers`` Ray Train workers (paths made absolute: workers run elsewhere)."""
    from galaxalign_batch.model.launch import absolute_paths, fit_workers

    out = Path(cfg.out).resolve()
    if cfg.resume == "no" and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    if cfg.resume == "yes" and ckpt.find_latest(out / "checkpoints") is None:
        raise ConfigError(f"--resume: no pretraining checkpoint under {out / 'checkpoints'}")
    out.mkdir(parents=True, exist_ok=True)
    worker = {**absolute_paths(cfg.to_dict()), "resume": "auto"}
    use_gpu = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cfg.device == "cuda" and not use_gpu:
        raise ConfigError("--device cuda: no GPU visible to torch here")
    fit_workers(_worker_loop, {"cfg": worker,
                               "log_level": logging.getLogger("galaxalign_batch").getEffectiveLevel() or logging.INFO},
                workers=cfg.workers, use_gpu=use_gpu, max_failures=cfg.max_failures,
                storage=out / "checkpoints" / "ray", name=RAY_RUN_NAME)
    return json.loads((out / "pretrain_summary.json").read_text())


def _worker_loop(config: dict) -> None:
    """One Ray Train worker of a pretraining."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=config.get("log_level", logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _pretrain(PretrainConfig(**config["cfg"]), rank=ctx.get_world_rank(), size=ctx.get_world_size(), device=device)


def _agreed_min(value: int, size: int, device: torch.device) -> int:
    """The smallest of the workers' ``value`` (every worker gets it)."""
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _check_workers_agree(model: torch.nn.Module, size: int, device: torch.device) -> None:
    """Every worker must end with the same weights (they step with the same averaged gradients)."""
    if size == 1:
        return
    with torch.no_grad():
        mine = torch.stack([sum(p.double().sum() for p in model.parameters()),
                            sum(p.double().abs().sum() for p in model.parameters())]).to(device)
    everyone = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine)
    if any(not torch.equal(e, everyone[0]) for e in everyone):
        raise ConfigError(f"pretraining workers ended with different weights ({[e.tolist() for e in everyone]}); "
                          f"this is a bug: please report it")


def _count_on_workers(refs, galaxies_only: bool, spec: CutoutSpec, rank: int, size: int) -> list[int]:
    """Usable sources per tile (:func:`count_sources`), each worker counting every ``size``-th tile."""
    mine = count_sources(refs[rank::size], galaxies_only, spec)
    if size == 1:
        return mine
    everyone: list = [None] * size
    dist.all_gather_object(everyone, mine)
    counts = [0] * len(refs)
    for r, part in enumerate(everyone):
        counts[r::size] = part
    return counts


def _pretrain(cfg: PretrainConfig, rank: int = 0, size: int = 1, device: torch.device | None = None) -> dict | None:
    from galaxalign_batch.survey.tiles import resolve_tiles
    from galaxalign_batch.model.inputs import resolve_device
    from galaxalign_batch.model.train import _param_groups, _schedule

    lead = rank == 0
    out = Path(cfg.out)
    if lead and cfg.resume == "no" and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device if device is not None else resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    refs = resolve_tiles(cfg.tiles, cfg.bricks)

    start = None if cfg.resume == "no" else ckpt.find_latest(out / "checkpoints")
    if size > 1:  # every worker starts from the checkpoint worker 0 found
        choice = [str(start) if start is not None else None]
        dist.broadcast_object_list(choice, src=0)
        start = Path(choice[0]) if choice[0] else None
    if start is None and cfg.resume == "yes":
        raise ConfigError(f"--resume: no pretraining checkpoint under {out / 'checkpoints'}")
    if start is not None:
        model, state, progress = ckpt.load_for_resume(start)
        saved = progress.get("config", {})
        diff = [k for k in RESUME_KEYS if k in saved and saved[k] != cfg.to_dict()[k]]
        if int(progress.get("world_size", 1)) != size:
            diff.append(f"workers: {progress.get('world_size', 1)}, now {size}")
        if diff:
            raise ConfigError(f"{start}: checkpoint of a different pretraining ({', '.join(diff)}); "
                              f"use another --out or --no-resume")
        counts = progress["counts"]
        if lead:
            log.info("resuming pretraining from %s (step %d)", start, progress["global_step"])
    else:
        state, progress = {}, {"epoch": 0, "chunk": 0, "batch": 0, "global_step": 0, "elapsed": 0.0}
        model = build_foundation_model(cfg)
    spec = CutoutSpec.from_dict(model.info["cutout_spec"])
    wide = wide_spec(spec)
    check_stretch_augment(spec.stretch, cfg.stretch_augment)  # the own stretch of a checkpoint continued from
    if start is None:
        counts = _count_on_workers(refs, cfg.galaxies_only, wide, rank, size)
        progress.update(counts=counts, usable=True)   # usable sources (the edge rule applied), not catalogue rows
    progress["world_size"] = size
    if sum(counts) < cfg.batch_size * size:
        raise ConfigError(f"{sum(counts)} usable sources in {len(refs)} tile(s): fewer than one batch of "
                          f"{cfg.batch_size}" + (f" for each of {size} workers" if size > 1 else ""))
    model.to(device)
    model.set_trainable("all")
    broadcast_parameters(model)
    alt_wide = tuple(dataclasses.replace(wide, stretch=s) for s in cfg.stretch_augment)
    context = int(model.info["open_clip"]["config"].get("text_cfg", {}).get("context_length", 77))
    fits = _token_budget(model, context - 2)

    buffer = cfg.buffer * size   # every worker holds up to cfg.buffer sources of a chunk
    plan = planned_steps(counts, buffer, size, cfg.batch_size, cfg.seed, cfg.epochs)
    steps_per_epoch = plan[0]
    if min(plan) == 0:
        raise ConfigError(f"{len(refs)} tile(s) of {sum(counts)} sources give no step of {cfg.batch_size} sources on "
                          f"each of {size} workers (tiles are dealt to workers whole, up to --buffer {cfg.buffer} "
                          f"sources each): use fewer workers, a smaller --batch-size or a larger --buffer")
    total = sum(plan)
    # no decay on the token embedding either: rows of words never seen must not shrink to zero
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, also_no_decay=("token_embedding",)),
                                  lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = _schedule(optimizer, total, cfg.warmup)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model.info["pretraining"] = {"config": cfg.to_dict(), "tiles": len(refs), "sources": int(sum(counts)),
                                 "steps_per_epoch": steps_per_epoch, "workers": size,
                                 "global_batch": size * cfg.batch_size}
    w_ii, w_ic = cfg.weights
    if lead:
        log.info("pretraining %s on %d usable sources of %d tile(s): %d epoch(s) x ~%d steps, batch %d%s, device %s",
                 model.info["open_clip"]["name"], sum(counts), len(refs), cfg.epochs, steps_per_epoch,
                 cfg.batch_size * size, f" ({size} workers x {cfg.batch_size}, global negatives)" if size > 1 else "",
                 device)
    step = int(progress["global_step"])
    t_run, elapsed0 = time.perf_counter(), float(progress.get("elapsed", 0.0))
    history = list(progress.get("history", []))
    run_loss, run_n = 0.0, 0
    pbar = bar(total=min(total, cfg.max_steps or total), desc="pretrain", unit="step", initial=step, disable=not lead)
    stop = bool(cfg.max_steps and step >= cfg.max_steps)

    def save(epoch: int, chunk: int, batch: int) -> None:
        if not lead:
            return
        progress.update(epoch=epoch, chunk=chunk, batch=batch, global_step=step, history=history,
                        elapsed=round(elapsed0 + time.perf_counter() - t_run, 1), config=cfg.to_dict())
        model.info["train_seconds"] = progress["elapsed"]
        lease.check_held(out)  # a run whose lease was taken (--force-unlock) stops before it writes again
        root = out / "checkpoints"
        ckpt.save_training_checkpoint(root / f"step_{step:07d}", model,
                                      {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                                      progress)
        ckpt.prune(root, "step_*", keep=2)

    # seeds of a worker's order and views: one worker's are those of the single-process run
    mine = [] if size == 1 else [rank]
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(int(progress["epoch"]), cfg.epochs if not stop else 0):
        order = epoch_order(cfg.seed, epoch, len(refs))
        chunks = plan_chunks(counts, buffer, order)
        first_chunk = int(progress["chunk"]) if epoch == int(progress["epoch"]) else 0
        for ci in range(first_chunk, len(chunks)):
            share = shard_tiles(chunks[ci], counts, size)[rank]
            data = load_chunk(refs, share, wide, cfg.galaxies_only, fits, alt_wide)
            perm = np.random.default_rng([cfg.seed, epoch, ci, *mine]).permutation(len(data.pixels))
            nb = _agreed_min(len(perm) // cfg.batch_size, size, device)
            first_batch = int(progress["batch"]) if (epoch, ci) == (int(progress["epoch"]), int(progress["chunk"])) else 0
            model.train()
            for b in range(first_batch, nb):
                idx = np.sort(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                rng = np.random.default_rng([cfg.seed, epoch, ci, b, *mine])
                # with alternates each view of a source is drawn in its own stretch (the own one or another)
                pick = np.random.default_rng([cfg.seed, epoch, ci, b, 1, *mine]) if data.alternates else None
                x1 = data.views_of(idx, pick)
                x2 = data.views_of(idx, pick) if pick is not None else x1
                v1 = model.prepare_images(make_views(x1, model.image_size, rng))
                v2 = model.prepare_images(make_views(x2, model.image_size, rng))
                caps = [data.captions[i] for i in idx]
                # the caption term only where every worker's batch has captions (the same loss on all)
                use_text = bool(_agreed_min(int(w_ic > 0 and all(c is not None for c in caps)), size, device))
                tokens = model.tokenize(caps).to(device) if use_text else None
                o = model(images=torch.cat([v1, v2]), tokens=tokens)
                f1, f2 = o["image"].float().split([len(idx), len(idx)])
                text = o["text"].float() if use_text else None
                loss = contrastive_loss(f1, text, f2, model.logit_scale.float(), class_ids=None,
                                        weights=(w_ic if use_text else 0.0, w_ii, w_ic if use_text else 0.0))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                allreduce_gradients(params)
                optimizer.step()
                scheduler.step()
                model.clamp_logit_scale()
                value = mean_over_workers(loss.detach()).item()
                if not math.isfinite(value):
                    raise ConfigError(f"pretraining diverged (loss {value}) at step {step + 1}; lower --lr")
                step += 1
                run_loss, run_n = run_loss + value, run_n + 1
                pbar.update(1)
                pbar.set_postfix(loss=f"{run_loss / run_n:.3f}")
                if step % 50 == 0:
                    history.append({"step": step, "loss": round(run_loss / run_n, 4),
                                    "logit_scale": round(model.logit_scale.item(), 3)})
                    if lead:
                        log.info("pretrain step %d/%d: loss %.4f, logit scale %.1f", step, total, run_loss / run_n,
                                 model.logit_scale.item())
                    run_loss, run_n = 0.0, 0
                if cfg.max_steps and step >= cfg.max_steps:
                    stop = True
                if stop or step % cfg.checkpoint_every == 0:
                    nxt = (epoch, ci, b + 1) if b + 1 < nb else (epoch, ci + 1, 0) if ci + 1 < len(chunks) \
                        else (epoch + 1, 0, 0)
                    save(*nxt)
                if stop:
                    break
            if stop:
                break
        if stop:
            break
        progress.update(epoch=epoch + 1, chunk=0, batch=0)
        if epoch + 1 == cfg.epochs and step % cfg.checkpoint_every:
            save(epoch + 1, 0, 0)   # a rerun of a finished pretraining finds it finished
    pbar.close()
    elapsed = round(elapsed0 + time.perf_counter() - t_run, 1)
    _check_workers_agree(model, size, device)
    if lead and not stop and step < total:
        log.warning("%d steps of the %d planned: a tile gave fewer usable sources in a pass than it was counted with "
                    "at the start (unreadable then?)%s; the learning-rate schedule ended at %.0f %% of its span", step,
                    total, "" if "usable" in progress else ", or the run was resumed from a checkpoint of a version "
                    "that counted catalogue rows", 100.0 * step / total)
    if not lead:
        return None
    model.info["train_seconds"] = elapsed
    model.info["pretraining"].update(global_step=step, history=history)
    lease.check_held(out)
    final = ckpt.save_model(model, out / "model.safetensors")
    summary = {"model": str(final), "global_step": step, "total_steps": total, "seconds": elapsed,
               "sources": int(sum(counts)), "tiles": len(refs), "workers": size, "global_batch": size * cfg.batch_size,
               "last_loss": history[-1]["loss"] if history else round(run_loss / run_n, 4) if run_n else None,
               "config": cfg.to_dict()}
    atomic.write_json(out / "pretrain_summary.json", summary)
    return summary


def _token_budget(model: GalaxAlignModel, max_tokens: int):
    tok = model.tokenizer
    encode = getattr(tok, "encode", None)
    if encode is None:
        return None
    return lambda text: len(encode(text)) <= max_tokens


# ---------------------------------------------------------------------------------------------- compact foundations

COMPACT_FORMAT = "galaxalign-foundation-compact"
COMPACT_KEY = ckpt.COMPACT_KEY   # the header key of its description
_ROWS, _VALUES = "__token_rows__", "__token_values__"
TOKEN_KEY = "clip.token_embedding.weight"


def _tensor_digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def export_foundation(model_path: str | Path, dest: str | Path) -> dict:
    """Write a pretrained model as a small file: weights in float16, and of the token embedding only the
    rows pretraining changed (the words of the captions); the other rows are the seeded initialisation
    (:func:`seeded_token_embedding`), regenerated by :func:`expand_foundation`. ~3.5 MB for galaxalign-tiny
    instead of 32 MB. Returns a description (rows kept, bytes)."""
    from galaxalign_batch.model.files import write_weights

    model = ckpt.load_checkpoint(model_path)
    pre = model.info.get("pretraining") or {}
    if not pre:
        raise ConfigError(f"{model_path}: not a pretrained foundation (no pretraining record)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    emb = state.pop(TOKEN_KEY)
    seed = int(pre["config"]["seed"])
    init = seeded_token_embedding(tuple(emb.shape), seed)
    rows = torch.nonzero((emb != init).any(1)).flatten()
    if len(rows) > len(emb) // 2:
        # not started from the seeded init (e.g. continued from an older run): keep the rows that received a
        # gradient (Adam's second moment > 0 in the run's last training checkpoint); the others never
        # influenced any loss, and are re-drawn from the seeded init
        rows = _rows_with_gradient(Path(model_path), tuple(emb.shape))
        log.info("token embedding not from the seeded init: keeping the %d rows that received gradients", len(rows))
    out = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out[_ROWS] = rows.to(torch.int64)
    out[_VALUES] = emb[rows].float().contiguous()           # the trained rows stay float32 (few)
    meta = {"format": COMPACT_FORMAT, "info": model.info, "token_init": {
        "seed": seed, "std": TOKEN_INIT_STD, "shape": list(emb.shape), "digest": _tensor_digest(init)},
        "weights_digest": model.info.get("weights_digest")}
    dest = write_weights(dest, out, COMPACT_KEY, meta)
    return {"file": str(dest), "bytes": dest.stat().st_size, "token_rows": int(len(rows)),
            "source": str(model_path)}


def _rows_with_gradient(model_path: Path, shape: tuple[int, int]) -> torch.Tensor:
    root = (model_path if model_path.is_dir() else model_path.parent) / "checkpoints"
    last = ckpt.find_latest(root)
    if last is None:
        raise ConfigError(f"{model_path}: its token embedding is not the seeded one and there is no training "
                          f"checkpoint under {root} to tell which rows were trained")
    state, _ = ckpt.load_training_state(last)
    found = [v["exp_avg_sq"] for v in state["optimizer"]["state"].values()
             if "exp_avg_sq" in v and tuple(v["exp_avg_sq"].shape) == shape]
    if len(found) != 1:
        raise ConfigError(f"{last}: cannot find the token embedding's optimizer state")
    return torch.nonzero(found[0].sum(1) > 0).flatten()


def read_compact(compact: str | Path) -> dict:
    """The header of a compact foundation file (``format``, ``info``: the model's description,
    ``token_init``, ``weights_digest`` of the model it was exported from); no tensors read."""
    from safetensors import safe_open

    try:
        with safe_open(str(compact), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(COMPACT_KEY, "{}"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise ConfigError(f"{compact}: not a compact foundation file ({' '.join(str(e).split())[:200]})") from None
    if meta.get("format") != COMPACT_FORMAT:
        raise ConfigError(f"{compact}: not a compact foundation file")
    return meta


def expand_foundation(compact: str | Path, dest: str | Path) -> Path:
    """The full checkpoint (``dest``, a ``model.safetensors``) of a compact foundation file. Fails if this
    torch regenerates a different token initialisation than the one the file was made with."""
    from safetensors.torch import load_file

    from galaxalign_batch.model.config import build_clip_from_config
    from galaxalign_batch.vocabulary import Vocabulary

    compact = Path(compact)
    meta = read_compact(compact)
    info, ti = meta["info"], meta["token_init"]
    init = seeded_token_embedding(tuple(ti["shape"]), int(ti["seed"]))
    if _tensor_digest(init) != ti["digest"]:
        raise ConfigError(f"{compact}: this torch regenerates a different token initialisation than the one the "
                          f"file was made with; re-create the foundation with the command in docs/model.md")
    state = load_file(str(compact))
    rows, values = state.pop(_ROWS), state.pop(_VALUES)
    init[rows] = values.float()
    state[TOKEN_KEY] = init
    oc = info["open_clip"]
    vocab = Vocabulary.from_dict(info["vocabulary"], str(compact))
    symbols = SymbolSet.from_dict(info["symbols"]) if info.get("symbols") else None
    model = GalaxAlignModel(build_clip_from_config(oc["config"]), dict(info),
                            tokenizer_for(oc["name"], oc["config"]), vocab, symbols)
    ref = model.state_dict()
    full = {k: v.to(ref[k].dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{compact}: weights do not match the described model ({missing[:3]}, {unexpected[:3]})")
    model.info["expanded_from"] = compact.name
    return ckpt.save_model(model, dest)
