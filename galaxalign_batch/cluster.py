"""Where Ray runs: the one policy of every command that uses it (``embed``, ``train --workers``).

1. ``address`` given (``--address auto`` or ``host:port``): join that cluster;
2. else the ``RAY_ADDRESS`` environment variable (set by ``ray job submit``, KubeRay, SLURM scripts): join it;
3. else a private local instance with ``num_cpus`` CPUs (default: all cores), never another user's
   cluster found running on this machine. Its workers run at the driver's priority (Ray's own default
   is niceness 15, which ``ray job submit`` also lifts to 0): the workers are the job, and at niceness 15
   any other program on the machine starves them. Measured on 2 cores beside two busy processes:
   ``embed`` of one small brick 132.9 s at 15, 22.7 s at 0 (a worker's ``import torch`` alone took 43 s).
   ``RAY_worker_niceness`` in the environment still wins.

A Ray instance already started in this process (tests, notebooks) is used as it is. A local start that
fails is tried once more (seen: Ray's fixed 30 s for its raylet to register missed on 2 busy cores); Ray
failing to start twice, or to join, is a :class:`~galaxalign_batch.errors.ClusterError`, one line (Ray's own errors are tracebacks:
"The current node timed out during startup" on an overloaded machine, a ConnectionError for a wrong address).
"""

from __future__ import annotations

import logging
import os

from galaxalign_batch.errors import ClusterError

__all__ = ["init_ray"]

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Start or join Ray per the module's policy; ``kwargs`` go to ``ray.init``."""
    import ray

    if ray.is_initialized():
        return
    kw = dict(ignore_reinit_error=True, include_dashboard=False, **kwargs)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address, **kw)
        except Exception as e:  # ConnectionError, RuntimeError, or a bare Exception, by Ray version and cause
            _shutdown()
            raise ClusterError(f"could not join the Ray cluster at {address}: {_first_line(e)} (is it running? "
                               "'ray status' on its head node says)") from e
        return
    if "RAY_worker_niceness" not in os.environ:
        kw["_system_config"] = {"worker_niceness": 0, **kw.get("_system_config", {})}
    for attempt in (1, 2):  # Ray gives its raylet 30 s to register (fixed); a busy machine can miss that once
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kw)
            return
        except Exception as e:
            _shutdown()
            if attempt == 1:
                log.warning("a local Ray instance did not start (%s); trying once more", _first_line(e))
                continue
            raise ClusterError(f"could not start a local Ray instance (2 tries): {_first_line(e)} Seen on an "
                               "overloaded machine (Ray's processes must start within its time-out) or a full /tmp: "
                               "try again; small `embed` runs go without Ray with --executor local") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".") + "."


def _shutdown() -> None:
    """Stop what a failed ``ray.init`` left running, if anything."""
    import ray

    try:
        ray.shutdown()
    except Exception:  # nothing started, or half: nothing more to do
        log.debug("ray.shutdown after a failed start", exc_info=True)
