"""Data-parallel training: global negatives across workers, gradient accumulation, Ray Train.

**One optimisation step** (:func:`step_gradients`), the same code in one process and in each of N
workers of a ``torch.distributed`` group (gloo on CPU, NCCL on GPU):

- the step's items are ``accum_steps`` micro-batches of ``--batch-size`` per worker; the
  *effective global batch* is ``workers x batch_size x accum_steps``;
- the contrastive loss is that of the whole global batch: every worker's loss
  (:func:`galaxalign_batch.model.loss.contrastive_loss`) contrasts its own rows with the
  all-gathered features of every worker (open_clip's ``--local-loss --gather-with-grad``);
  ``negatives="local"`` keeps each worker to its own items (the behaviour before global negatives);
- with ``accum_steps = K > 1`` the encoders first run **without gradients** over the K
  micro-batches and only their features are kept (``K x B x D`` per modality); the loss over all
  of them is computed and differentiated down to those cached features; then each micro-batch is
  encoded again **with** gradients (the random state of its first pass restored, so dropout or
  patch dropout draw the same masks) and back-propagated with its slice of the cached feature
  gradients (GradCache, Gao et al. 2021; open_clip's ``--accum-freq`` does the same with one loss
  evaluation per micro-batch). The encoders' activation memory is that of one micro-batch; the
  gradients are those of the full batch, exactly (tested in float64);
- the parameter gradients are then averaged over the workers (:func:`allreduce_gradients`) and
  the caller steps its optimiser. Parameters start equal on every worker
  (:func:`broadcast_parameters` from rank 0 at the start of each stage).

**Ray Train** (:func:`galaxalign_batch.model.launch.train_distributed`, ``--workers N``): each worker runs
:func:`galaxalign_batch.model.train.run_training` on its shard of every epoch (the same seeded
permutation, rows ``rank::N``). Rank 0 validates, writes ``metrics.csv`` and reports a checkpoint
each epoch; Ray persists it under ``<out>/checkpoints/ray/train/epoch_NNNN``. A worker failure
restarts the group from the newest complete checkpoint of the run (``max_failures`` times); a new
run on the same ``--out`` resumes from the latest checkpoint there, whether a local or a Ray one. Paths of the
configuration (``--data``, ``--out``, ``--symbols``, a vocabulary or checkpoint file) are made
absolute before they reach the workers, whose working directory is not the caller's.

:func:`launch_local` starts a gloo group of N processes on loopback without Ray (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.model.loss import contrastive_loss, world

log = logging.getLogger(__name__)

FEATURES = ("image", "text", "symbol")


# ---------------------------------------------------------------------------------------------- process group

def broadcast_parameters(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers to every worker (in place; a no-op without a group)."""
    if world(group)[1] == 1:
        return
    tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor)]
    for chunk in _buckets(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in chunk])
        dist.broadcast(flat, src, group=group)
        _unflatten_into(flat, chunk)


def allreduce_gradients(parameters, group=None) -> None:
    """Average the gradients of ``parameters`` over the workers, in place (missing gradients count as 0)."""
    _, size = world(group)
    if size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for chunk in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in chunk])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(size)
        _unflatten_into(flat, chunk)


def mean_over_workers(value: torch.Tensor, group=None) -> torch.Tensor:
    """The average of a (detached) tensor over the workers."""
    _, size = world(group)
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value / size


def _buckets(tensors: list[torch.Tensor], limit: int = 64 << 20):
    """Tensors grouped by (dtype, device) into lists of at most ``limit`` bytes (one collective each)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        chunk, size = [], 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if chunk and size + nbytes > limit:
                yield chunk
                chunk, size = [], 0
            chunk.append(t)
            size += nbytes
        if chunk:
            yield chunk


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


# ---------------------------------------------------------------------------------------------- one step

@dataclass
class MicroBatch:
    """One micro-batch of prepared model inputs (on the model's device).

    ``images`` (B, 3, S, S) normalised; ``labels`` (B,) class ids; ``symbols`` (B, 3, S, S) or None;
    ``tokens`` the batch's distinct prompts and ``inverse`` (B,) the row of each item's prompt.
    """

    images: torch.Tensor
    labels: torch.Tensor
    symbols: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def encode(model: torch.nn.Module, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """The features (B, D) of a micro-batch, per modality (``text`` expanded to one row per item)."""
    out = model(images=mb.images, symbols=mb.symbols, tokens=mb.tokens)
    feats = {"image": _at_least_float32(out["image"])}
    if "text" in out:
        feats["text"] = _at_least_float32(out["text"])[mb.inverse]
    if "symbol" in out:
        feats["symbol"] = _at_least_float32(out["symbol"])
    return feats


@contextlib.contextmanager
def _replay_rng(device: torch.device, state: tuple):
    """Run a block with the RNG state ``state`` (from :func:`_rng_state`), restoring the current one after."""
    cpu, cuda = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def step_gradients(
    model: torch.nn.Module,
    batches: list[MicroBatch],
    *,
    weights: tuple[float, float, float] | None,
    impl: str = "auto",
    negatives: str = "global",
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    group=None,
) -> torch.Tensor:
    """Accumulate the gradients of one optimisation step over ``batches`` (this worker's micro-batches).

    ``weights``: the pair weights of the contrastive loss, or None for cross-entropy on the linear
    head (``image-only``). The gradients (``.grad``, scaled by ``scaler`` when given) end up equal on
    every worker: those of the loss of the global batch (all workers' micro-batches together), as
    one process holding the whole batch would compute them. Returns that loss (detached, the same on
    every worker). The caller zeroes the gradients before and steps the optimiser after.
    """
    if not batches:
        raise ConfigError("step_gradients: no micro-batches")
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    model_params = [p for p in model.parameters() if p.requires_grad]
    if weights is None:  # cross-entropy: per-item, so plain gradient accumulation is exact
        total_n = sum(len(mb) for mb in batches)
        value = torch.zeros((), device=batches[0].labels.device)
        for mb in batches:
            with autocast():
                logits = model(images=mb.images)["logits"]
                loss = F.cross_entropy(logits.float(), mb.labels, reduction="sum") / total_n
            scale(loss).backward()
            value = value + loss.detach()
        allreduce_gradients(model_params, group)
        return mean_over_workers(value, group)

    def loss_of(feats: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logit_scale = _at_least_float32(model.logit_scale)
        return contrastive_loss(feats.get("image"), feats.get("text"), feats.get("symbol"), logit_scale,
                                class_ids=labels, weights=weights, impl=impl, negatives=negatives, group=group)

    if len(batches) == 1:
        mb = batches[0]
        with autocast():
            loss = loss_of(encode(model, mb), mb.labels)
        scale(loss).backward()
    else:
        device = batches[0].images.device
        states, cached = [], []
        with torch.no_grad():  # pass 1: features only
            for mb in batches:
                states.append(_rng_state(device))
                with autocast():
                    cached.append({k: v.detach() for k, v in encode(model, mb).items()})
        names = [k for k in FEATURES if k in cached[0]]
        leaves = {k: torch.cat([c[k] for c in cached]).requires_grad_() for k in names}
        labels = torch.cat([mb.labels for mb in batches])
        with autocast():
            loss = loss_of(leaves, labels)
        scale(loss).backward()  # d loss / d features (and d loss / d logit_scale into its .grad)
        start = 0
        for mb, state in zip(batches, states):  # pass 2: each micro-batch again, with gradients
            end = start + len(mb)
            with _replay_rng(device, state), autocast():
                feats = encode(model, mb)
            torch.autograd.backward([feats[k] for k in names], [leaves[k].grad[start:end] for k in names])
            start = end
    allreduce_gradients(model_params, group)
    # global negatives: each worker's loss is its share and their mean is the global batch's loss;
    # local negatives: the mean of the workers' own-batch losses
    return mean_over_workers(loss.detach(), group)


# ---------------------------------------------------------------------------------------------- local group

def _local_entry(fn, rank: int, size: int, root: str, threads: int | None, args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if threads:
        torch.set_num_threads(threads)
    result_path = Path(root) / f"result_{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=size)
        try:
            result = fn(rank, size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, result_path)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, result_path)
        raise SystemExit(1) from None


def launch_local(fn: Callable, world_size: int, *args, threads: int | None = 1, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes forming a gloo group on
    loopback; returns their results in rank order (``fn`` and its results must pickle). Any failing
    process raises ``RuntimeError`` with its traceback; the others are stopped."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="galaxalign-group-") as root:
        procs = [ctx.Process(target=_local_entry, args=(fn, r, world_size, root, threads, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout)
                if p.is_alive():
                    raise RuntimeError(f"launch_local: a worker did not finish in {timeout:.0f} s")
            results = []
            for rank in range(world_size):
                path = Path(root) / f"result_{rank}.pt"
                if not path.is_file():
                    raise RuntimeError(f"launch_local: rank {rank} died (exit code {procs[rank].exitcode})")
                out = torch.load(path, weights_only=False)
                if "error" in out:
                    raise RuntimeError(f"launch_local: rank {rank} failed:\n{out['error']}")
                results.append(out["ok"])
            return results
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
