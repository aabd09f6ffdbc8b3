"""Where a training runs: in this process, or on N Ray Train workers.

:func:`train` is the entry point of ``galaxalign-batch train`` (and of scripts): it prepares the
output folder and runs :func:`galaxalign_batch.model.train.run_training` here, or, with
``cfg.workers >= 1``, :func:`train_distributed` on Ray Train workers that each run
``run_training`` on their shard of every epoch (the step primitives they share are in
:mod:`galaxalign_batch.model.distributed`). Rank 0 validates, writes ``metrics.csv`` and reports a
checkpoint each epoch; Ray persists it under ``<out>/checkpoints/ray/train/epoch_NNNN``. A worker
failure restarts the group from the newest complete checkpoint of the run (``max_failures``
times); a new run on the same ``--out`` resumes from the latest checkpoint there, whether a local
or a Ray one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from galaxalign_batch import atomic, lease
from galaxalign_batch.errors import ConfigError, GalaxAlignError
from galaxalign_batch.model import checkpoint as ckpt
from galaxalign_batch.model.train import RunContext, TrainConfig, run_training

__all__ = ["train", "train_distributed", "fit_workers", "newest_complete_checkpoint", "absolute_paths"]

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"


def train(cfg: TrainConfig, *, force_unlock: bool = False) -> dict:
    """Run a training per ``cfg``: in this process, or with Ray Train when ``cfg.workers >= 1``.

    The run holds the lease of ``cfg.out`` (:mod:`galaxalign_batch.lease`) from before it touches the folder
    until it has written the model: a second run into the same folder refuses with one line naming this one
    (``force_unlock``: take the lease of a run you know is gone).
    """
    out = Path(cfg.out)
    with lease.locked(out, force=force_unlock):
        ckpt.clear_leftovers(out)
        if cfg.resume == "no" and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out / "train_config.json", {**cfg.to_dict(), "batch": cfg.batch_layout()})
        if cfg.workers >= 1:
            return train_distributed(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return run_training(cfg)


# ---------------------------------------------------------------------------------------------- Ray Train

def newest_complete_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest training checkpoint under ``root`` (ours or Ray's) whose files all read back.

    Ray copies a reported checkpoint into its storage file by file, so a worker killed during the
    copy leaves a directory with every file present and one of them torn; such directories are
    skipped (with a warning) in favour of the next newest.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    found = []
    for progress in root.rglob(ckpt.PROGRESS_FILE):
        d = progress.parent
        if not ckpt.is_complete(d):
            continue
        try:
            p = json.loads(progress.read_text())
            found.append(((int(p["epoch"]), int(p.get("global_step", 0)), progress.stat().st_mtime), d))
        except (OSError, ValueError, KeyError):
            log.warning("skipping the torn checkpoint %s (unreadable %s)", d, ckpt.PROGRESS_FILE)
    for _, d in sorted(found, key=lambda kd: kd[0], reverse=True):
        try:
            ckpt.load_training_state(d)
            ckpt.read_info(d)  # safetensors refuses a file shorter than its header says
        except ConfigError as e:
            log.warning("skipping the torn checkpoint %s: %s", d, e)
            continue
        return d
    return None


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch


    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    logging.basicConfig(level=config.get("log_level", logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    # Where to start: after a worker failure, the newest complete checkpoint of this run. Ray's own record
    # (get_checkpoint) misses a checkpoint that was written but not yet collected from every worker when
    # one died, so rank 0 also looks in the run's checkpoint folder (the driver emptied it for --no-resume;
    # a copy torn by the failure is skipped) and tells the others, so that all workers start from the same one.
    choice = [None]
    if rank == 0:
        found = newest_complete_checkpoint(Path(cfg.out) / "checkpoints")
        restored = ray.train.get_checkpoint()
        choice = [str(found) if found is not None else restored.path if restored is not None else config.get("resume_dir")]
    if size > 1:
        dist.broadcast_object_list(choice, src=0)
    resume_dir = Path(choice[0]) if choice[0] else None
    with checkpoint_staging() as tmp:
        def report(metrics: dict, ckpt_dir: Path | None) -> None:
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{int(metrics['epoch']):04d}")
            if ckpt_dir is not None:  # Ray has copied it to storage (synchronous upload)
                shutil.rmtree(ckpt_dir, ignore_errors=True)

        run_training(cfg, RunContext(rank=rank, world_size=size, device=device, resume_dir=resume_dir,
                                     checkpoint_root=Path(tmp), report=report))


STAGING_PREFIX = "galaxalign-ckpt-"


def checkpoint_staging() -> tempfile.TemporaryDirectory:
    """The folder a Ray Train worker writes each checkpoint into before Ray copies it to the run's storage:
    ``$TMPDIR/galaxalign-ckpt-PID-XXXX``, removed when the worker ends. A worker killed (SIGKILL, the OOM
    killer, a node agent) cannot remove its own, so each new one first removes the folders of workers on this
    machine whose process is gone (seen: one empty folder left in /tmp per killed worker; a kill while a
    checkpoint was staged would leave the checkpoint, a ViT-B-16's 600 MB)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{STAGING_PREFIX}*-*"):
        pid = old.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not lease.pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def absolute_paths(cfg_dict: dict) -> dict:
    """The configuration with its paths (data or tiles, out, symbols, vocabulary / checkpoint / weights files)
    made absolute against this process's working directory, for workers that run elsewhere. Tiles may be
    globs and ``@list`` files (``survey.tiles.resolve_tiles``'s grammar)."""
    d = dict(cfg_dict)
    if d.get("data"):
        d["data"] = str(Path(d["data"]).resolve())
    if d.get("tiles"):
        d["tiles"] = ["@" + str(Path(t[1:]).resolve()) if t.startswith("@") else str(Path(t).resolve())
                      for t in d["tiles"]]
    d["out"] = str(Path(d["out"]).resolve())
    if d.get("symbols"):
        d["symbols"] = str(Path(d["symbols"]).resolve())
    if d.get("store"):
        d["store"] = str(Path(d["store"]).resolve())
    if d.get("survey"):
        d["survey"] = [str(Path(r).resolve()) for r in d["survey"]]
    for key in ("vocabulary", "pretrained"):
        if d.get(key) and Path(d[key]).is_file():
            d[key] = str(Path(d[key]).resolve())
    model = d.get("model")
    if model and (model.endswith(".safetensors") or Path(model).is_dir()):
        d["model"] = str(Path(model).resolve())
    return d


def train_distributed(cfg, *, use_gpu: bool | None = None, cpus_per_worker: float = 1.0) -> dict:
    """Run ``cfg`` (a TrainConfig) on ``cfg.workers`` Ray Train workers (starting a local Ray instance if none is running)."""
    if cfg.workers < 1:
        raise ConfigError("train_distributed needs --workers >= 1")
    if use_gpu is None:
        use_gpu = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    worker_cfg = absolute_paths(cfg.to_dict())
    out = Path(worker_cfg["out"])
    if cfg.resume == "no" and (out / "checkpoints").exists():  # workers resume from what they find there
        shutil.rmtree(out / "checkpoints")
    resume_dir = None
    if cfg.resume != "no":
        resume_dir = newest_complete_checkpoint(out / "checkpoints")
        if resume_dir is None and cfg.resume == "yes":
            raise ConfigError(f"--resume: no training checkpoint under {out / 'checkpoints'}")
        if resume_dir is not None:
            log.info("resuming from %s", resume_dir)
    result = fit_workers(_worker_loop, {"cfg": {**worker_cfg, "resume": "no"},
                                        "resume_dir": str(resume_dir) if resume_dir else None,
                                        "log_level": logging.getLogger("galaxalign_batch").getEffectiveLevel()
                                        or logging.INFO},
                         workers=cfg.workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                         max_failures=cfg.max_failures, storage=out / "checkpoints" / "ray", name=RAY_RUN_NAME,
                         keep_checkpoints=2)
    summary_path = out / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    return summary


def fit_workers(loop, config: dict, *, workers: int, use_gpu: bool, storage: Path, name: str,
                cpus_per_worker: float = 1.0, max_failures: int = 2, keep_checkpoints: int | None = None):
    """Run ``loop(config)`` on ``workers`` Ray Train workers (a torch.distributed group: gloo on CPU, NCCL with
    GPUs), starting a local Ray instance if none is running; a worker failure restarts the group
    (``max_failures`` times). Ray keeps its run state (and the checkpoints ``loop`` reports) under
    ``storage/name``. Returns Ray's result; an error of ours raised in a worker is raised here as itself,
    any other as one :class:`ConfigError` line."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from galaxalign_batch.cluster import init_ray

    init_ray(num_cpus=max(int(workers * cpus_per_worker), os.cpu_count() or 1))
    storage = Path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        return trainer.fit()
    except GalaxAlignError:
        raise
    except Exception as e:  # Ray wraps worker errors; surface ours as one line
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, GalaxAlignError):
            raise cause from None
        raise ConfigError(f"Ray Train run failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}") from None
