"""Connecting to Ray: an existing cluster when one is named, else an embedded local Ray.

`ray.address` in config, else RAY_ADDRESS, selects a cluster (this is what `ray job submit`
sets for the driver). Otherwise a local Ray starts in-process with more logical CPUs than
cores: Ray Data's decode actors and the training workers each hold CPU slots, and on a 2-core
laptop an exact count leaves the read stage starved (it waits forever, silently).
"""

from __future__ import annotations

import logging
import os

from clipray.config import RayConfig


def init_ray(cfg: RayConfig | None = None, quiet: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(log_to_driver=not quiet, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
        return
    num_cpus = cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    # the dashboard stays on: it hosts the State API, which Ray Train uses to watch its controller
    ray.init(num_cpus=num_cpus, **kwargs)


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars drown a driver's own progress line."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
