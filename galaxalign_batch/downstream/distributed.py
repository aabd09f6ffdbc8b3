"""Where downstream work runs: a thread pool in this process (the default), or Ray tasks on a cluster.

``join`` (partitioned output), ``classify`` and ``fewshot --apply`` cut their work into independent
tasks (HEALPix partitions, row batches of whole chunks) and hand them to an :class:`Executor`:

- :class:`LocalExecutor`: threads of this process (``--threads``), as before;
- :class:`RayExecutor`: plain Ray tasks on the cluster :func:`galaxalign_batch.cluster.init_ray`
  starts or joins (``--address``, else ``RAY_ADDRESS``, else a private local instance). A task is
  a module-level function of this package, so every node needs the same package installed (as
  for ``embed``), and the store, the catalogue and the output must be on a file system every node
  sees (a POSIX shared file system, as ``embed`` needs). A task whose worker dies is retried by Ray
  (``retries``); its partial output was never renamed into place, so the retry starts clean.

Both give results **as tasks finish** (:meth:`Executor.imap_unordered`), or in submission order with
a bounded number in flight (:meth:`Executor.ordered`, for the store's ``DerivedWriter``, whose commit
point is a prefix of rows).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor", "process_bytes_read"]


def process_bytes_read(pid: int | str = "self") -> int:
    """Bytes a process (this one by default) has read through read(2) and friends so far (``rchar`` of
    /proc/PID/io; 0 where there is no such file)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Executor:
    """Runs ``fn(*args)`` for many argument tuples."""

    kind = "?"
    slots = 1  # tasks run at once

    def imap_unordered(self, fn: Callable, items: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """``(index, fn(*items[index]))`` as tasks finish; an error of any task is raised."""
        raise NotImplementedError

    def ordered(self, fn: Callable, items: Sequence[tuple], ahead: int | None = None) -> Iterator[Any]:
        """``fn(*item)`` for each item, in order, with at most ``ahead`` tasks submitted and not yet consumed."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, threads: int | None = None):
        self.slots = max(1, int(threads or os.cpu_count() or 1))

    def imap_unordered(self, fn, items):
        if self.slots == 1:
            for i, it in enumerate(items):
                yield i, fn(*it)
            return
        with cf.ThreadPoolExecutor(self.slots) as pool:
            pending = {}
            todo = iter(enumerate(items))
            for i, it in todo:
                pending[pool.submit(fn, *it)] = i
                if len(pending) >= 2 * self.slots:
                    break
            while pending:
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    yield i, fut.result()
                    for j, it in todo:
                        pending[pool.submit(fn, *it)] = j
                        break

    def ordered(self, fn, items, ahead=None):
        if self.slots == 1:
            for it in items:
                yield fn(*it)
            return
        ahead = ahead or 2 * self.slots
        with cf.ThreadPoolExecutor(self.slots) as pool:
            queue: collections.deque = collections.deque()
            todo = iter(items)
            for it in todo:
                queue.append(pool.submit(fn, *it))
                if len(queue) >= ahead:
                    break
            while queue:
                out = queue.popleft().result()
                for it in todo:
                    queue.append(pool.submit(fn, *it))
                    break
                yield out


class RayExecutor(Executor):
    """Ray tasks (one CPU each); ``retries``: how often Ray re-runs a task whose worker died."""

    kind = "ray"

    def __init__(self, address: str | None = None, retries: int = 3):
        import ray

        from galaxalign_batch.cluster import init_ray

        init_ray(address, log_to_driver=False)
        self.retries = int(retries)
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        self._remote: dict[Callable, Any] = {}
        log.info("Ray: %d node(s), %d CPU(s)", self.nodes, self.slots)

    def _task(self, fn):
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1, max_retries=self.retries)(fn)
        return self._remote[fn]

    def imap_unordered(self, fn, items):
        import ray

        task = self._task(fn)
        pending: dict = {}
        todo = iter(enumerate(items))
        try:
            for i, it in todo:
                pending[task.remote(*it)] = i
                if len(pending) >= 2 * self.slots:
                    break
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    yield i, ray.get(ref)
                    for j, it in todo:
                        pending[task.remote(*it)] = j
                        break
        finally:
            for ref in pending:
                ray.cancel(ref, force=False)

    def ordered(self, fn, items, ahead=None):
        import ray

        task = self._task(fn)
        ahead = ahead or 2 * self.slots
        queue: collections.deque = collections.deque()
        todo = iter(items)
        try:
            for it in todo:
                queue.append(task.remote(*it))
                if len(queue) >= ahead:
                    break
            while queue:
                out = ray.get(queue.popleft())
                for it in todo:
                    queue.append(task.remote(*it))
                    break
                yield out
        finally:
            for ref in queue:
                ray.cancel(ref, force=False)

    def put(self, value):
        import ray

        return ray.put(value)


def make_executor(address: str | None = None, threads: int | None = None, *, retries: int = 3) -> Executor:
    """Ray tasks when ``address`` is given (``auto`` or host:port; ``local`` starts a private instance),
    else a thread pool of ``threads``."""
    if address:
        return RayExecutor(None if address == "local" else address, retries=retries)
    return LocalExecutor(threads)


def ordered_batches(executor: Executor, fn: Callable, batches: Iterable[tuple[int, int]], *args) -> Callable:
    """A ``compute(start, stop)`` for :meth:`DerivedWriter.write` whose batches ``fn(start, stop, *args)`` run
    ahead on ``executor``; the writer asks for them in order and must ask for exactly ``batches``."""
    batches = list(batches)
    results = executor.ordered(fn, [(a, b) + tuple(args) for a, b in batches])
    expect = iter(batches)

    def compute(start: int, stop: int):
        want = next(expect, None)
        if want != (start, stop):
            raise RuntimeError(f"batch {start}-{stop} asked for, {want} planned")
        return next(results)

    return compute
