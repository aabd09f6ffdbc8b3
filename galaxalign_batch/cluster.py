"""Where Ray runs: the one policy of every command that uses it (``embed``, ``train --workers``).

1. ``address`` given (``--address auto`` or ``host:port``): join that cluster;
2. else the ``RAY_ADDRESS`` environment variable (set by ``ray job submit``, KubeRay, SLURM scripts): join it;
3. else a private local instance with ``num_cpus`` CPUs (default: all cores), never another user's
   cluster found running on this machine.

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
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kw)
