"""Data-parallel training with Ray Train (TorchTrainer): gloo on CPU, NCCL on GPU, a checkpoint per epoch.

Each of the N workers runs :func:`galaxalign_batch.model.train.run_training` on its shard of every
epoch (the same seeded permutation, rows ``rank::N``) with a per-worker batch of
``--batch-size``; gradients are averaged by DistributedDataParallel (contrastive negatives are
those of the worker's own batch). Rank 0 validates, writes ``metrics.csv`` and reports a checkpoint
each epoch; Ray persists it under ``<out>/checkpoints/ray/train/epoch_NNNN``. A worker failure
restarts the group from the last reported checkpoint (``max_failures`` times); a new run on the
same ``--out`` resumes from the latest checkpoint there, whether a local or a Ray one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from galaxalign_batch.errors import ConfigError, GalaxAlignError
from galaxalign_batch.model.train import RunContext, TrainConfig, run_training

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    logging.basicConfig(level=config.get("log_level", logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    restored = ray.train.get_checkpoint()  # set after a worker failure: the last reported checkpoint
    resume_dir = Path(restored.path) if restored is not None else (Path(config["resume_dir"]) if config.get("resume_dir") else None)
    with tempfile.TemporaryDirectory(prefix="galaxalign-ckpt-") as tmp:
        def report(metrics: dict, ckpt_dir: Path | None) -> None:
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{int(metrics['epoch']):04d}")
            if ckpt_dir is not None:  # Ray has copied it to storage (synchronous upload)
                shutil.rmtree(ckpt_dir, ignore_errors=True)

        run_training(cfg, RunContext(rank=rank, world_size=world, device=device, resume_dir=resume_dir,
                                     checkpoint_root=Path(tmp), report=report))


def train_distributed(cfg: TrainConfig, *, use_gpu: bool | None = None, cpus_per_worker: float = 1.0) -> dict:
    """Run ``cfg`` on ``cfg.workers`` Ray Train workers (starting a local Ray instance if none is running)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from galaxalign_batch.model import checkpoint as ckpt

    if cfg.workers < 1:
        raise ConfigError("train_distributed needs --workers >= 1")
    if use_gpu is None:
        use_gpu = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    out = Path(cfg.out).resolve()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:  # a cluster the user points at
            ray.init(address=address)
        else:  # a private local instance, never someone else's cluster found on this machine
            ray.init(address="local", num_cpus=max(int(cfg.workers * cpus_per_worker), os.cpu_count() or 1),
                     include_dashboard=False)
    resume_dir = None
    if cfg.resume != "no":
        resume_dir = ckpt.find_latest(out / "checkpoints")
        if resume_dir is None and cfg.resume == "yes":
            raise ConfigError(f"--resume: no training checkpoint under {out / 'checkpoints'}")
        if resume_dir is not None:
            log.info("resuming from %s", resume_dir)
    storage = out / "checkpoints" / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": {**cfg.to_dict(), "out": str(out), "resume": "no"},
                           "resume_dir": str(resume_dir) if resume_dir else None,
                           "log_level": logging.getLogger("galaxalign_batch").getEffectiveLevel() or logging.INFO},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    try:
        result = trainer.fit()
    except GalaxAlignError:
        raise
    except Exception as e:  # Ray wraps worker errors; surface ours as one line
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, GalaxAlignError):
            raise cause from None
        raise ConfigError(f"Ray Train run failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}") from None
    summary_path = out / "train_summary.json"
    import json

    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    return summary
