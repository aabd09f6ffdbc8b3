"""Where Ray runs: the one policy of every command that uses it (``embed``, ``train --workers``).

1. ``address`` given (``--address auto`` or ``host:port``): join that cluster;
2. else the ``RAY_ADDRESS`` environment variable (set by ``ray job submit``, KubeRay, SLURM scripts): join it;
3. else a private local instance with ``num_cpus`` CPUs (default: all cores), never another user's
   cluster found running on this machine. Its workers run at the driver's priority (Ray's own default
   is niceness 15, which ``ray job submit`` also lifts to 0): the workers are the job, and at niceness 15
   any other program on the machine starves them. Measured on 2 cores beside two busy processes:
   ``embed`` of one small brick 132.9 s at 15, 22.7 s at 0 (a worker's ``import torch`` alone took 43 s).
   ``RAY_worker_niceness`` in the environment still wins.

A Ray instance already started in this process (tests, notebooks) is used as it is.
"""

from __future__ import annotations

import logging
import os

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
        ray.init(address=address, **kw)
    else:
        if "RAY_worker_niceness" not in os.environ:
            kw["_system_config"] = {"worker_niceness": 0, **kw.get("_system_config", {})}
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kw)
