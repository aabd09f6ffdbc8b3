"""The embedding run: Ray tasks read and cut tiles, an actor pool runs the model, the driver writes.

Data flow (bounded, streaming)::

    driver ──submit──> prepare_tile tasks (CPU, one per tile, at most `max_inflight` at a time)
                         │ PreparedTile meta ──> driver         pixels (object ref) ──┐
                         v                                                            v
                       driver ──────────────────────────────> EncoderActor.embed (pool of CPU/GPU actors)
                         ^                                                            │
                         └──────────── embeddings (N x D) <───────────────────────────┘
                       driver: buffer finished tiles -> EmbeddingStore.commit (one writer, whole tiles)

Exactly once: only the driver writes, whole tiles at a time, and a tile's rows and record become
visible in one replace of the store's root ``zarr.json`` (see :mod:`galaxalign_batch.store`). The
driver holds the store's lock (one writer per store) from before Ray starts to the end. A re-run
skips the tiles recorded as done and retries the failed ones. Pixels travel task -> actor through
Ray's object store without passing through the driver.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from galaxalign_batch import lease, progress
from galaxalign_batch.engine import images, preflight
from galaxalign_batch.engine.encoder import describe_model, model_identity
from galaxalign_batch.engine.selection import check_resume
from galaxalign_batch.model.precision import CHOICES as PRECISION_CHOICES
from galaxalign_batch.survey.tiles import TileRef
from galaxalign_batch.errors import ConfigError, TileError
from galaxalign_batch.store import EmbeddingStore
from galaxalign_batch.store.embedding_store import as_str

log = logging.getLogger(__name__)


@dataclass
class EmbedSummary:
    store: str
    tiles_total: int
    tiles_skipped: int  # already in the store from an earlier run
    tiles_done: int
    tiles_failed: dict[str, str] = field(default_factory=dict)
    tiles_lost: list[str] = field(default_factory=list)  # infrastructure failures: not recorded, re-run does them
    sources: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # Ray connection + model replicas loaded (included in seconds)
    timings: dict[str, float] = field(default_factory=dict)  # summed task seconds per stage
    warnings: list[str] = field(default_factory=list)  # shown first in the summary (random weights, a stretch...)
    ray_started: bool = True  # False when every tile was already done (no Ray, no model) or executor="local"
    executor: str = "ray"  # "local": this process did the work without Ray
    precisions: list[str] = field(default_factory=list)  # what the model replicas ran in (fp32, bf16)

    @property
    def ok(self) -> bool:
        return not self.tiles_failed and not self.tiles_lost

    def lines(self) -> list[str]:
        rate = self.sources / self.seconds if self.seconds else 0.0
        out = [f"WARNING: {w}" for w in self.warnings]
        out += [f"store: {self.store}",
               f"tiles: {self.tiles_done} embedded, {self.tiles_skipped} already done, "
               f"{len(self.tiles_failed)} failed, {len(self.tiles_lost)} lost (of {self.tiles_total})",
               f"sources: {self.sources} in {self.seconds:.1f} s ({rate:.1f} sources/s; "
               + (f"start-up {self.startup_seconds:.1f} s)" if self.ray_started
                  else f"in this process without Ray, start-up {self.startup_seconds:.1f} s)" if self.executor == "local"
                  else "nothing to do: Ray not started)")]
        if self.precisions:
            out.append(f"model precision: {', '.join(self.precisions)} (--precision; docs/engine.md, 'Precision')")
        if self.timings:
            out.append("task time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        # a TileError's reason starts with the file's path: say it once
        out += [f"FAILED {name}: {reason.removeprefix(name + ': ')}" for name, reason in sorted(self.tiles_failed.items())]
        out += [f"LOST {name} (worker or node failure; re-run to finish it)" for name in self.tiles_lost]
        return out


def prepare_task(ref: TileRef, spec_dict: dict, catalog: str, max_image_pixels: int | None = None,
                 image_scale: dict | None = None, selection=None, bands=None, model_bands=None):
    """Read and cut one task's tile: ``(meta, pixels)``, or ``(failure, None)`` for a tile that cannot be
    used (its reason in ``meta["error"]``). ``ref`` may be an :class:`~galaxalign_batch.engine.images.ImageGroup`
    (pictures, ``image_scale`` says what they show). The body of every executor's tile task."""
    from galaxalign_batch.engine.prepare import prepare_tile, set_bands
    from galaxalign_batch.engine.selection import prepare_selected
    from galaxalign_batch.preprocess import CutoutSpec
    from galaxalign_batch.survey.tile import set_max_image_pixels

    set_max_image_pixels(max_image_pixels)  # every task: a worker process serves tasks of several runs
    set_bands(bands, model_bands)
    try:
        if isinstance(ref, images.ImageGroup):
            return images.prepare_images(ref, CutoutSpec.from_dict(spec_dict), image_scale or {})
        spec = CutoutSpec.from_dict(spec_dict)
        p = (prepare_tile(ref, spec, catalog=catalog) if selection is None
             else prepare_selected(ref, spec, catalog, selection))
    except TileError as e:
        return {"ref": ref, "error": str(e)}, None
    except Exception as e:  # a reader bug or an input nobody foresaw: record it, do not loop on it
        logging.getLogger(__name__).exception("unexpected error in tile %s", ref.name)
        return {"ref": ref, "error": f"{ref.path}: unexpected {type(e).__name__}: {' '.join(str(e).split())}"}, None
    return {"ref": ref, "columns": p.columns, "timings": p.timings}, p.pixels


def _prepare_remote(*args, **kwargs):
    """Ray task body: :func:`prepare_task`, with Numba's threads following the CPUs Ray gave the task."""
    import numba

    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, int(os.environ.get("OMP_NUM_THREADS", "1")))))
    return prepare_task(*args, **kwargs)


class _EncoderActor:
    """Holds one model replica (on a GPU when the actor was given one)."""

    def __init__(self, model: str, device: str, batch_size: int, threads: int = 1, precision: str = "auto"):
        import torch

        from galaxalign_batch.engine.encoder import load_encoder

        from galaxalign_batch.model.inputs import resolve_device

        device = str(resolve_device(device))
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder(model, device=device, precision=precision)
        self.batch_size = batch_size

    def describe(self) -> dict:
        """The model's description (:meth:`Encoder.describe`) and the precision this replica runs it in."""
        return {**self.encoder.describe(), "precision": self.encoder.precision}

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        out = self.encoder.encode(pixels, batch_size=self.batch_size)
        return out, time.perf_counter() - t


def cpu_pool(n_cpus: int, threads: int | None = None) -> tuple[int, int]:
    """``(replicas, torch threads each)`` for CPU model replicas on a cluster of ``n_cpus``.

    Measured on the tiny model (docs/engine.md): the model is ~70 % of a source's CPU time, reading
    and cutting the rest. So every core runs model work: one replica per ``threads`` cores (1 thread
    up to 15 CPUs, then ``n_cpus // 8`` so a big node holds 8 replicas, not one per core). The
    replicas reserve no CPU from Ray (they are spread over the nodes instead): every CPU stays a
    slot for tile tasks, which the OS time-shares with the replicas, and the backpressure of
    ``max_inflight`` keeps the tile tasks from running far ahead of the model. A reservation would
    deadlock after a node loss: the replicas restart on the surviving nodes and can hold every CPU
    a tile task needs (seen with 3 half-CPU replicas on a 2-CPU head).
    """
    threads = threads or max(1, n_cpus // 8)
    return max(1, n_cpus // threads), threads


def _init_ray(address: str | None, cpus: int | None) -> None:
    from galaxalign_batch.cluster import init_ray

    init_ray(address, cpus, log_to_driver=False)


def embed_tiles(tiles: list[TileRef], model: str, out: str | os.PathLike, *, batch_size: int | None = None,
                cpu_workers: int | None = None, cpu_threads: int | None = None, gpu_workers: int | None = None, device: str = "auto",
                precision: str = "auto", address: str | None = None, catalog: str = "auto", max_inflight: int | None = None,
                commit_rows: int = 65536, commit_seconds: float = 30.0, embedding_dtype: str = "float16",
                retry_failed: bool = True, stall_seconds: float = 120.0, force_unlock: bool = False,
                max_image_pixels: int | None = None, log_every: float = 30.0,
                image_scale: dict | None = None, stretch: str | None = None, bands=None, selection=None,
                executor: str = "ray") -> EmbedSummary:
    """Embed every source of ``tiles`` into the store at ``out`` (created, or resumed if it exists).

    Before Ray starts: the model spec, ``catalog`` and ``out`` are checked and the store's lock is
    taken (:class:`~galaxalign_batch.store.LockError` when another run writes it; ``force_unlock``
    takes it anyway). The lock is held until the function returns. A re-run with nothing left to do
    returns before Ray is started or the model is loaded. ``log_every``: seconds between progress log
    lines when stderr is not a terminal (0: none). ``image_scale``: what RGB pictures among ``tiles``
    show (:func:`~galaxalign_batch.engine.images.scale_record`), recorded in the store. ``stretch``: the
    stretch of the cutouts (default: the model's; another is warned about for a trained checkpoint and
    recorded); ``bands``: the bands to read (:func:`~galaxalign_batch.survey.bands.choose_bands`). ``selection``: a
    :class:`~galaxalign_batch.engine.selection.Selection` (targets, a cut, kept columns), recorded in the store.
    ``executor``: ``"ray"`` (tasks and a model actor pool, local or on a cluster) or ``"local"`` (this
    process alone, no Ray: small runs and tests); see :class:`EmbedRun`. ``precision``: what the model
    runs in (``auto``, ``fp32``, ``bf16``; :mod:`galaxalign_batch.model.precision`), resolved by each replica
    for its own hardware; the store records every precision its rows were made in (``precisions``).
    """
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    t_start = time.perf_counter()
    tiles = selection.restrict(tiles) if selection is not None else tiles
    # The model's identity without torch (a re-run with nothing to do needs no more); the full description
    # (spec, dimension; imports torch and open_clip) when there is work. ConfigError for a bad --model.
    identity = model_identity(model)
    info = describe_model(model) if identity is None else None
    identity = identity or info["identity"]
    warnings = [RANDOM_WEIGHTS_WARNING] if identity.get("kind") == "tiny" else []
    has_pictures = any(isinstance(t, images.ImageRef) for t in tiles)
    image_scale = (image_scale or images.scale_record(None, None)) if has_pictures else None
    catalog = preflight.check_catalog(catalog)
    out = preflight.check_output(out)
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or int(max_image_pixels) < 1):
        raise ConfigError(f"--max-image-pixels must be a positive number of pixels, got {max_image_pixels!r}")
    lock = lease.acquire(out, force=force_unlock)
    try:
        store = preflight.open_for_resume(out, info, embedding_dtype, identity=identity)
        if store is not None:
            check_resume(store, selection)  # the same selection (targets file, cut) as the store's
            log.info("resuming %s: %d rows, %d tiles done", out, store.n_rows, len(store.completed_tiles()))
            if n := store.remove_leftovers():
                log.info("%s: removed %d temporary file(s) of writes a killed run left", out, n)
            have = store.attrs.get("image_scale")
            if image_scale is not None and have is not None and have != image_scale:
                raise ConfigError(f"{out}: its pictures were embedded with image scale {have}, this run says "
                                  f"{image_scale}; give the same --pixscale / --angular-size, or another --out")
            preflight.check_stretch(out, store, stretch)
            if (summary := _nothing_to_do(tiles, out, store, retry_failed, t_start)) is not None:
                summary.warnings = warnings
                return summary
        if info is None:
            info = describe_model(model)
            if store is not None:
                store = preflight.open_for_resume(out, info, embedding_dtype)
        pictures_only = has_pictures and all(isinstance(t, images.ImageRef) for t in tiles)
        seen = preflight.stretches_seen(model, identity) if stretch else ((), ())
        info, run_bands, notes = preflight.run_spec(info, stretch, bands, pictures_only, *seen)
        warnings += notes
        run = EmbedRun(tiles, model, out, info, store, t_start, catalog=catalog, commit_rows=commit_rows,
                       commit_seconds=commit_seconds, embedding_dtype=embedding_dtype, retry_failed=retry_failed,
                       max_image_pixels=max_image_pixels, log_every=log_every, warnings=warnings,
                       image_scale=image_scale, bands=run_bands, selection=selection)
        if executor == "local":
            summary = run_in_process(run, batch_size=batch_size, device=device, threads=cpu_threads, precision=precision)
            summary.ray_started, summary.executor = False, "local"
        else:
            summary = run_on_ray(run, batch_size=batch_size, cpu_workers=cpu_workers, cpu_threads=cpu_threads,
                                 gpu_workers=gpu_workers, device=device, address=address, max_inflight=max_inflight,
                                 stall_seconds=stall_seconds, precision=precision)
        summary.warnings = warnings + summary.warnings
        return summary
    finally:
        lease.release(lock)


RANDOM_WEIGHTS_WARNING = ("--model tiny has RANDOM weights: these embeddings are meaningless beyond smoke tests "
                          "(train a model with 'galaxalign-batch train' and pass its checkpoint)")


def _todo(tiles: list[TileRef], store: EmbeddingStore | None, retry_failed: bool) -> list[TileRef]:
    """The tiles a run still has to do: not done in the store, and (with ``retry_failed``) failed ones again."""
    done = store.completed_tiles() if store else set()
    earlier_failed = store.failed_tiles() if store else {}
    return [t for t in tiles if t.name not in done and (retry_failed or t.name not in earlier_failed)]


def _nothing_to_do(tiles: list[TileRef], out: str, store: EmbeddingStore, retry_failed: bool,
                   t_start: float) -> EmbedSummary | None:
    """The summary of a re-run that finds every tile done (finishing the store if a crash left it open),
    without starting Ray or loading the model; None when there is work."""
    if _todo(tiles, store, retry_failed):
        return None
    if not store.attrs.get("complete"):
        store.finalize()
    log.info("%s: all %d tile(s) already done; nothing to embed", out, len(tiles))
    summary = EmbedSummary(out, len(tiles), len(tiles), 0, ray_started=False)
    summary.seconds = time.perf_counter() - t_start
    return summary


EXECUTORS = ("ray", "local")


class EmbedRun:
    """One embed run after its pre-flight: what is left to do, the store, the commits and the summary.

    An *executor* drives it: it runs :meth:`task_args` through :func:`prepare_task` for every ref of
    :attr:`plan`, hands each result to :meth:`prepared`, runs the model on the pixels of those that
    need it, and hands the embeddings to :meth:`embedded`; at the end it calls :meth:`finish`. The run
    decides everything else, the same for every executor: the store (created when the model has been
    checked, :meth:`start`), which tiles failed and why, duplicate ids, and when finished tiles are
    committed (whole tiles, every ``commit_rows`` rows or ``commit_seconds`` seconds). Two executors:
    Ray tasks and an actor pool (:func:`run_on_ray`, the default) and this process alone, without Ray
    (:func:`run_in_process`, for small runs and tests).
    """

    def __init__(self, tiles: list[TileRef], model: str, out: str, info: dict, store: EmbeddingStore | None,
                 t_start: float, *, catalog: str = "auto", commit_rows: int = 65536, commit_seconds: float = 30.0,
                 embedding_dtype: str = "float16", retry_failed: bool = True, max_image_pixels: int | None = None,
                 log_every: float = 30.0, warnings=(), image_scale: dict | None = None, bands=None, selection=None):
        self.tiles, self.model, self.out, self.info, self.store = tiles, model, out, info, store
        self.t_start = t_start
        self.catalog, self.commit_rows, self.commit_seconds = catalog, commit_rows, commit_seconds
        self.embedding_dtype, self.max_image_pixels = embedding_dtype, max_image_pixels
        self.warnings, self.image_scale, self.bands, self.selection = list(warnings), image_scale, bands, selection
        self.todo = _todo(tiles, store, retry_failed)
        self.plan = images.plan(self.todo)  # pictures in groups, one task each
        self.summary = EmbedSummary(out, len(tiles), len(tiles) - len(self.todo), 0)
        self.timings = {"read": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0}
        self.spec = info["cutout_spec"]  # the run's (--stretch); the model replicas describe the model's
        self.model_info = {k: v for k, v in info.items() if k != "model_cutout_spec"}
        self.model_info["cutout_spec"] = info.get("model_cutout_spec", self.spec)
        self.model_bands = tuple(dict(self.spec["band_planes"])) if self.spec["stretch"] != "none" else None
        self.startup: float | None = None
        self.describe_replicas = None  # set by the executor: () -> list of the loaded models' describe()
        self._pending: list[tuple[str, dict | None, str]] = []
        self._pending_rows, self._last_commit = 0, time.perf_counter()
        self._ids_of_run: dict[str, tuple[str, ...]] = {}  # id brick -> tiles of this run whose ids name it
        self._taken_ids: set[str] | None = None  # object ids of the store and of this run's pictures (read once)
        self.bar = progress.bar(total=len(self.todo), desc="tiles", unit="tile")
        self.ticker = progress.RateLog(len(self.todo), log_every, logger=log)  # log lines when stderr is not a terminal

    # ---------------------------------------------------------------------------------------- for executors
    def task_args(self, ref) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of :func:`prepare_task` for ``ref``."""
        tile_sel = (None if self.selection is None or isinstance(ref, images.ImageGroup)
                    else self.selection.for_tile(ref.name))
        return ((ref, self.spec, self.catalog, self.max_image_pixels, self.image_scale, tile_sel),
                {"bands": self.bands, "model_bands": self.model_bands})

    @property
    def finished(self) -> int:
        s = self.summary
        return s.tiles_done + len(s.tiles_failed) + len(s.tiles_lost)

    def start(self) -> None:
        """Check the loaded model against its description, then create the store (or update its attributes).
        Called once, before the first commit, when the executor's model replicas have loaded."""
        if self.startup is not None:
            return
        described = self.describe_replicas()
        self.summary.precisions = sorted({d.get("precision", "fp32") for d in described})
        described = [{k: v for k, v in d.items() if k != "precision"} for d in described]
        if any(d != self.model_info for d in described):
            raise ConfigError(f"--model {self.model!r}: the loaded model differs from its description "
                              f"({described[0]['identity']} / {described[0]['cutout_spec']} vs "
                              f"{self.info['identity']} / {self.info['cutout_spec']})")
        self.startup = time.perf_counter() - self.t_start
        sel = self.selection
        if self.store is None:
            self.store = EmbeddingStore.create(self.out, self.info["dim"], dtype=self.embedding_dtype,
                                               attrs={**_store_attrs(self.info, self.warnings), **(sel.attrs() if sel else {}),
                                                      "precisions": self.summary.precisions,
                                                      "model_path": _model_location(self.model)},
                                               extra_columns=sel.keep if sel is not None else ())
        store = self.store
        roots = sorted({t.path for t in self.tiles if t.is_brick} | set(store.attrs.get("survey_roots", [])))
        if roots != store.attrs.get("survey_roots", []):
            store.update_attrs({"survey_roots": roots})  # where thumbnails / re-made cutouts come from
        before = store.attrs.get("precisions") or []
        precisions = sorted(set(before) | set(self.summary.precisions))
        if before and precisions != before:  # a resume in another precision (another machine, another --precision)
            note = (f"this store's earlier rows were made in {', '.join(before)}, this run's in "
                    f"{', '.join(self.summary.precisions)} (--precision; the store records both)")
            log.warning("%s", note)
            self.summary.warnings.append(note)
        if precisions != store.attrs.get("precisions"):
            store.update_attrs({"precisions": precisions})  # a resumed store: what the model ran in, every run
        if self.image_scale is not None and store.attrs.get("image_scale") != self.image_scale:
            store.update_attrs({"image_scale": self.image_scale})  # what the RGB pictures show

    def lost(self, ref, reason: str) -> None:
        """A task lost to the infrastructure (worker or node died beyond retries): not recorded, a re-run does it."""
        log.warning("tile %s lost: %s", ref.name, reason)
        self.summary.tiles_lost.extend(_members(ref))
        self.bar.update(len(_members(ref)))

    def prepared(self, meta: dict) -> bool:
        """A tile task's result: True when its pixels go to the model; False when the tile failed (recorded)."""
        ref = meta["ref"]
        if "error" in meta:
            log.warning("skipping %s", meta["error"])
            for name in _members(ref):
                self._pending.append((name, None, meta["error"]))
                self.summary.tiles_failed[name] = meta["error"]
            self.bar.update(len(_members(ref)))
            self.flush()
            return False
        for k, v in meta["timings"].items():
            self.timings[k] += v
        return True

    def embedded(self, meta: dict, emb: np.ndarray, seconds: float) -> None:
        """The model's embeddings of a prepared tile (or picture group): buffered for the next commit."""
        s, ref = self.summary, meta["ref"]
        self.timings["model"] += seconds
        if isinstance(ref, images.ImageGroup):  # one record per picture
            for name, rows, reason in images.split_group(meta, emb, self._picture_ids()):
                self._pending.append((name, rows, reason))
                if rows is None:
                    log.warning("skipping %s", reason)
                    s.tiles_failed[name] = reason
                else:
                    s.tiles_done += 1
                    s.sources += 1
                    self._pending_rows += 1
            self.bar.update(len(ref.refs))
            self.flush()
            return
        rows = dict(meta["columns"], embedding=emb)
        clash = _id_clash(ref, rows["object_id"], self.store, self._pending, self._ids_of_run)
        if clash:
            log.warning("skipping %s: %s", ref.name, clash)
            self._pending.append((ref.name, None, clash))
            s.tiles_failed[ref.name] = clash
            self.bar.update(1)
            self.flush()
            return
        self._pending.append((ref.name, rows, ""))
        self._pending_rows += len(emb)
        s.tiles_done += 1
        s.sources += len(emb)
        self.bar.update(1)
        self.bar.set_postfix(sources=s.sources)
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Commit the buffered tiles when ``commit_rows`` rows or ``commit_seconds`` seconds are reached (or ``force``)."""
        if self._pending and (force or self._pending_rows >= self.commit_rows
                              or time.perf_counter() - self._last_commit > self.commit_seconds):
            self.start()
            t = time.perf_counter()
            self.store.commit(self._pending)
            self.timings["write"] += time.perf_counter() - t
            self._pending, self._pending_rows, self._last_commit = [], 0, time.perf_counter()

    def finish(self) -> EmbedSummary:
        """Commit what is left and close the store (also when nothing was embedded: the model is still
        checked and the store made)."""
        self.start()
        self.flush(force=True)
        self.store.finalize()
        return self.summary

    def close(self) -> EmbedSummary:
        """The summary with its times (also after an error: the progress bar is closed)."""
        self.bar.close()
        s = self.summary
        s.seconds = time.perf_counter() - self.t_start
        s.startup_seconds = self.startup or 0.0
        s.timings = self.timings
        return s

    def _picture_ids(self) -> set[str]:
        if self._taken_ids is None:
            store = self.store
            self._taken_ids = set(as_str(store.read("object_id"))) if store is not None and store.n_rows else set()
        return self._taken_ids


def run_in_process(run: EmbedRun, *, batch_size: int | None = None, device: str = "auto",
                   threads: int | None = None, precision: str = "auto") -> EmbedSummary:
    """The in-process executor: every tile read, cut and embedded in this process, one after another,
    without Ray. For small runs (a few tiles, a folder of pictures) and tests; the store, its commits and
    the summary are the same as :func:`run_on_ray`'s."""
    import torch

    actor = _EncoderActor(run.model, device, batch_size or 64, threads or torch.get_num_threads(), precision)
    run.describe_replicas = lambda: [actor.describe()]
    try:
        for ref in run.plan:
            args, kwargs = run.task_args(ref)
            meta, pixels = prepare_task(*args, **kwargs)
            run.ticker.update(run.finished, run.summary.sources)
            if not run.prepared(meta):
                continue
            run.start()
            emb, seconds = actor.embed(pixels)
            run.embedded(meta, emb, seconds)
        run.finish()
    finally:
        run.close()
    return run.summary


def run_on_ray(run: EmbedRun, *, batch_size: int | None, cpu_workers: int | None, cpu_threads: int | None,
               gpu_workers: int | None, device: str, address: str | None, max_inflight: int | None,
               stall_seconds: float, precision: str = "auto") -> EmbedSummary:
    """The Ray executor: tile tasks (at most ``max_inflight`` at a time) and a pool of model actors
    (one per GPU, or CPU replicas sized by :func:`cpu_pool`); pixels go task -> actor through Ray's object
    store. A task lost to a dead worker or node is counted as lost (a re-run does it)."""
    import ray

    _init_ray(address, cpu_workers)
    resources = ray.cluster_resources()
    n_gpus = int(resources.get("GPU", 0))
    if gpu_workers is None:
        gpu_workers = n_gpus if device in ("auto", "cuda") else 0
    if gpu_workers > n_gpus:
        raise ConfigError(f"--gpu-workers {gpu_workers} but the Ray cluster has {n_gpus} GPU(s)")
    if device == "cuda" and gpu_workers == 0:
        raise ConfigError("--device cuda but the Ray cluster has no GPU")
    n_cpus = int(resources.get("CPU", 1))
    actor_cls = ray.remote(_EncoderActor)
    fault = dict(max_restarts=-1, max_task_retries=2)
    if gpu_workers:
        batch_size = batch_size or 256
        actors = [actor_cls.options(num_gpus=1, num_cpus=1, **fault).remote(run.model, "cuda", batch_size, 1, precision)
                  for _ in range(gpu_workers)]
    else:
        batch_size = batch_size or 64  # measured: larger CPU batches are slower (cache), see docs/engine.md
        replicas, threads = cpu_pool(n_cpus, cpu_threads)
        env = {"env_vars": {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}}
        actors = [actor_cls.options(num_cpus=0, scheduling_strategy="SPREAD", runtime_env=env, **fault)
                  .remote(run.model, "cpu", batch_size, threads, precision) for _ in range(replicas)]
        log.info("%d CPU model replica(s), %d torch thread(s) each", replicas, threads)
    replicas_ready = [a.describe.remote() for a in actors]

    def describe_replicas() -> list[dict]:
        """Block until every replica has loaded (tile tasks go on meanwhile)."""
        try:
            return ray.get(replicas_ready)
        except ray.exceptions.RayError as e:
            for a in actors:
                ray.kill(a)
            raise ConfigError(f"the model replicas could not load {run.model!r}: {_root_cause(e)}") from None

    run.describe_replicas = describe_replicas
    prepare = ray.remote(_prepare_remote).options(num_returns=2, max_retries=3, retry_exceptions=False)
    max_inflight = max_inflight or max(4, 2 * n_cpus)
    queue = list(reversed(run.plan))
    preparing: dict = {}  # meta ref -> (ref, pixels ref)
    embedding: dict = {}  # embed ref -> (meta, actor index)
    actor_load = [0] * len(actors)
    ticker = run.ticker
    last_event = time.perf_counter()
    try:
        while queue or preparing or embedding:
            while queue and len(preparing) + len(embedding) < max_inflight:
                ref = queue.pop()
                args, kwargs = run.task_args(ref)
                meta_ref, pix_ref = prepare.remote(*args, **kwargs)
                preparing[meta_ref] = (ref, pix_ref)
            ready, _ = ray.wait(list(preparing) + list(embedding), num_returns=1,
                                timeout=min(stall_seconds, ticker.every) if ticker.active else stall_seconds)
            ticker.update(run.finished, run.summary.sources)
            if not ready:
                if time.perf_counter() - last_event >= stall_seconds:
                    log.warning("no tile finished in the last %.0f s (%d preparing, %d embedding); Ray resources "
                                "free: %s", stall_seconds, len(preparing), len(embedding), ray.available_resources())
                    last_event = time.perf_counter()
                continue
            last_event = time.perf_counter()
            r = ready[0]
            if r in preparing:
                ref, pix_ref = preparing.pop(r)
                try:
                    meta = ray.get(r)
                except (ray.exceptions.RayError, TileError) as e:  # worker died beyond retries, object lost...
                    run.lost(ref, str(e).splitlines()[0])
                    continue
                if not run.prepared(meta):
                    continue
                run.start()
                i = int(np.argmin(actor_load))
                actor_load[i] += 1
                embedding[actors[i].embed.remote(pix_ref)] = (meta, i)
            else:
                meta, i = embedding.pop(r)
                actor_load[i] -= 1
                try:
                    emb, seconds = ray.get(r)
                except ray.exceptions.RayError as e:
                    run.lost(meta["ref"], "in the model actor: " + str(e).splitlines()[0])
                    continue
                run.embedded(meta, emb, seconds)
        run.finish()
    finally:  # also on an error or an interrupt: no model replica outlives the run
        run.close()
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # already gone with its node
                pass
    return run.summary


def _members(ref) -> list[str]:
    """The tile keys a task stands for: a picture group's pictures, else the tile itself."""
    return ref.members if isinstance(ref, images.ImageGroup) else [ref.name]


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost error message of a Ray failure (e.g. the ConfigError of a replica)."""
    cause = getattr(e, "cause", None) or e.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause if cause is not None else e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def _store_attrs(info: dict, warnings=()) -> dict:
    """The attributes of a new store. ``random_weights`` is true for ``--model tiny`` (its embeddings mean
    nothing); ``warnings`` keeps the run's warnings (the same lines as the summary's)."""
    return {"model": info["identity"], "vocabulary": info.get("vocabulary"), "cutout_spec": info["cutout_spec"],
            "normalised": True, "random_weights": info["identity"].get("kind") == "tiny", "warnings": list(warnings),
            **({"model_cutout_spec": info["model_cutout_spec"]} if "model_cutout_spec" in info else {})}


def _model_location(model: str) -> str:
    """Where the model came from, for a reader of the store: a file's resolved path, else the name given."""
    from galaxalign_batch.model.spec import parse_model_spec

    spec = parse_model_spec(model)
    path = str(spec.path) if spec.kind == "checkpoint" else spec.weights
    return os.path.realpath(path) if path and os.path.isfile(path) else model


def _id_bricks(ids: np.ndarray) -> set[str]:
    """The bricks named by Legacy Survey ids ``release/brick/objid`` among ``ids``."""
    out = set()
    for oid in as_str(ids):
        parts = oid.split("/")
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
            out.add(parts[1])
    return out


def _id_clash(ref: TileRef, ids: np.ndarray, store: EmbeddingStore | None, pending: list,
              ids_of_run: dict[str, tuple[str, ...]]) -> str | None:
    """Why the tile's object ids cannot go into the store (duplicates), or None.

    Detected ids embed the tile's key and cannot collide. Catalog ids ``release/brick/objid`` can:
    the same brick's catalog under two survey roots (a mirror, or two copies of one release) gives the
    same ids. They are compared with the ids of every other tile naming the same brick, in this run
    and (by the brick folder of their key) in the store; a clash fails the tile with this reason.
    """
    ids = as_str(ids)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        return f"{int((counts > 1).sum())} object id(s) appear twice in the tile (e.g. {uniq[counts > 1][0]})"
    bricks = _id_bricks(ids)
    if not bricks:
        return None
    others: list[str] = []
    for b in sorted(bricks):
        others += [t for t in ids_of_run.get(b, ()) if t != ref.name]
        if store is not None:
            others += [t for t in store.completed_tiles() if os.path.basename(t) == b and t != ref.name]
    pend = {name: rows for name, rows, _ in pending if rows is not None}
    for other in dict.fromkeys(others):
        if other in pend:
            theirs = as_str(pend[other]["object_id"])
        elif store is not None and (span := store.tile_rows(other)) is not None:
            theirs = as_str(store.read("object_id", slice(span[0], span[0] + span[1])))
        else:
            continue
        both = np.intersect1d(ids, theirs)
        if len(both):
            return (f"{len(both)} of its {len(ids)} object ids are already taken by tile {other} (e.g. {both[0]}): "
                    "the same catalog under two survey roots? Embed one of them only")
    for b in bricks:
        ids_of_run[b] = ids_of_run.get(b, ()) + (ref.name,)
    return None
