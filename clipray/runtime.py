"""Connecting to Ray: an existing cluster when one is named, else an embedded local Ray.

`ray.address` in config, else RAY_ADDRESS, selects a cluster (this is what `ray job submit`
sets for the driver); `local` (Ray's word for a new local instance) is the embedded Ray below,
so `ray.address=local` runs locally whatever RAY_ADDRESS says. Otherwise a local Ray starts
in-process with more logical CPUs than cores: Ray Data's decode tasks and the training workers
each hold CPU slots, and on a 2-core laptop an exact count leaves the read stage starved (it
waits forever, silently).

The embedded Ray deletes freed objects from the object store within 50 ms instead of Ray's
1 s (`FREE_OBJECTS_ENV`). Ray Data frees each batch as soon as it is consumed, but Ray batches
the deletions; meanwhile the decoders keep writing, so the store hands out memory no
process has touched yet and the writer takes a page fault on every 4 kB of it (28k faults,
35 ms of CPU per 116 MB batch here), until every page of the store has been through every
decoder. Deleted within 50 ms, a freed batch's memory is what the next batch gets
(docs/benchmarks-data-log.md). Clusters keep Ray's default: each round of deletions is sent to
every node, so a shorter period multiplies that traffic by the node count, while on real clips
(~130 ms each to decode) the faults cost under 1%.

Its processes also read Ray Data's logging setup from `ray_data_logging.yaml`: warnings on the
console, INFO lines in Ray Data's log file only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Iterator

from clipray.config import ConfigError, RayConfig

@contextlib.contextmanager
def exclusive(lock_file: str, busy: Exception) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (made if absent) for the block, or raise `busy` at
    once when another process holds it. The kernel releases it when the process ends, however
    it ends, so a killed run leaves nothing to clean up. A filesystem without locks (ENOLCK) is
    used unlocked."""
    import fcntl

    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        except OSError:
            pass
        yield


# Ray reads its settings from RAY_<name> in the environment of each of its processes
FREE_OBJECTS_ENV = "RAY_free_objects_period_milliseconds"
FREE_OBJECTS_PERIOD_MS = "50"

# how often Ray Train's controller polls its workers (Ray's default 2 s): each phase of a run (the
# worker group up, each report, the end) waits for the next poll. On the embedded Ray a short
# training run ends 3-5 s sooner at 0.5 s (`clipray bench poll`: one epoch of the demo's model on
# 24 synthetic videos, 2 cores, medians 28.9 -> 25.6 s and 29.6 -> 25.1 s; docs/benchmarks.md).
# Read from the driver's environment when a run starts; a user's own value wins.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"

# how long Serve's controller waits for its HTTP proxy's readiness check (Ray's default 5 s): it
# kills a proxy that misses 3 in a row, and `serve.start` then fails with ActorDiedError rather
# than wait for the next one. On a busy 2-core machine (Ray's workers run at nice 15, so any
# other work takes their CPU) the proxy's start missed three 5 s checks and every Serve test of
# the session errored. 20 s keeps the three checks within `serve.start`'s own minute.
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
PROXY_READY_S = "20"

# Ray Train's preemption watcher (on by default in Ray 2.60), off on the embedded Ray: it watches
# for nodes that Ray is told to drain (a cloud's spot instance reclaimed), which a local Ray on
# one machine never is, and Ray logs an error line for it on every run's console ("core_worker.cc:
# Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store
# and max_restarts > 0"): Ray Train starts it with max_restarts=-1. A cluster keeps it. Read from
# the driver's environment when a run starts (Ray Train passes it to its controller).
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

# Ray Data's logging setup for the embedded Ray's processes (a user's own value wins)
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
RAY_DATA_LOGGING = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")

# what the Ray that init_ray started in this process has ({"CPU": 4.0, "GPU": 0.0}); None when
# it joined a cluster
_embedded: dict[str, float] | None = None
# Ray Data's read and filter tasks ask for one CPU each; with none left over they never run
READ_TASK_CPUS = 1.0


def _cpu_quota(cpu_max: str, cfs_dir: str) -> tuple[int, int] | None:
    """The cgroup's CPU quota and period in us, None for none: cgroup v2's cpu.max, else cgroup
    v1's cpu.cfs_quota_us (-1 for none) and cpu.cfs_period_us (Docker on a cgroup v1 host:
    CentOS/RHEL 7, Amazon Linux 2, Ubuntu before 21.10)."""
    try:
        quota, period = open(cpu_max).read().split()[:2]
        return None if quota == "max" else (int(quota), int(period))
    except (OSError, ValueError):  # no cgroup v2 here
        pass
    try:
        quota = int(open(os.path.join(cfs_dir, "cpu.cfs_quota_us")).read())
        period = int(open(os.path.join(cfs_dir, "cpu.cfs_period_us")).read())
        return (quota, period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):  # no cgroup v1 either
        return None


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max", cfs_dir: str = "/sys/fs/cgroup/cpu") -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), and
    a cgroup CPU quota, v2 or v1 (a container's --cpus, a Kubernetes CPU limit), where that is
    fewer. os.cpu_count() is the host's: in a 4-CPU container on a 64-core host it sized the
    embedded Ray (and the benches' defaults) for 64 cores; a cgroup v1 quota was not read."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cpu_quota(cpu_max, cfs_dir)
    if quota:
        n = min(n, max(1, quota[0] // quota[1]))  # whole cores, as Ray counts them
    return n


def cap_threads() -> None:
    """This process's torch and faiss (OpenMP) threads at `usable_cores()`, unless
    OMP_NUM_THREADS says otherwise. Both count the cores they see, not a CPU quota: a driver in
    a 4-CPU container on a 64-core host (a Kubernetes CPU limit) ran clipray index's faiss build
    and its recall queries on 64 threads, 16 to a core, throttled by the quota. faiss's count is
    this thread's, the one that builds it in clipray index. Ray's workers get their own count
    (OMP_NUM_THREADS from their CPUs). torch only where it is imported (2 s, which clipray serve's
    driver has no use for): a later import calls this again."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = usable_cores()
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > n:
        torch.set_num_threads(n)
    try:  # faiss's wheel may bring its own OpenMP (imported before torch's, it does)
        import faiss
    except ImportError:
        return
    if faiss.omp_get_max_threads() > n:
        faiss.omp_set_num_threads(n)


def loopback_direct() -> None:
    """Add this machine's loopback to no_proxy (and NO_PROXY) where an HTTP proxy is set, for
    this process and the Ray it starts. HTTP clients send every request to $http_proxy unless
    $no_proxy names the host, and a proxy cannot reach this machine's 127.0.0.1: behind one, Ray
    Train's placement-group cleaner asked the dashboard's State API through it, failed every time
    ('Failed to query Ray Train Controller actor state') and so could not tell when a run's
    controller had died."""
    if not any(os.environ.get(v) for v in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")):
        return
    for var in ("no_proxy", "NO_PROXY"):
        have = [h.strip() for h in os.environ.get(var, "").split(",") if h.strip()]
        os.environ[var] = ",".join(have + [h for h in ("127.0.0.1", "localhost", "::1") if h not in have])


def proc_status_kb(field: str) -> int | None:
    """A field of this process's /proc/self/status in kB (VmRSS: resident now, VmHWM: the peak);
    None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Bring this process's peak resident set (VmHWM) down to the current one (Linux; elsewhere
    the peak stays the one since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def check_answers(address: str, named: str, timeout_s: float = 10.0, shown: str = "") -> None:
    """A cluster address (host:port, or ray://host:port) where nothing accepts a connection is a
    one-line error: ray.init retried it for minutes, printing a warning every few seconds (a
    stale RAY_ADDRESS in the shell, a cluster that is down). "auto" and other forms go to Ray."""
    import socket

    client = address.lower().startswith("ray://")
    hostport = address[len("ray://"):].rstrip("/") if client else address
    if client and not re.search(r":\d+$", hostport):
        # Ray Client's own default port: ray://HOST was not checked, and waited 30 s in
        # ray.init, then a ConnectionError traceback
        hostport += ":10001"
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"{shown or named + '=' + address}: nothing answers there ({e.strerror or e}): start the "
                          "cluster, or unset it to run on an embedded local Ray") from None


def find_auto(named: str) -> str:
    """The cluster that `auto` names, as ray.init finds it: the last `ray start` here
    (/tmp/ray/ray_current_cluster), else a Ray running on this machine. With none, ray.init's
    ConnectionError was a traceback; a `ray start` since stopped without `ray stop` (a reboot, a
    killed head) left an address where nothing answers, which ray.init retried for minutes."""
    from ray._private import services

    try:
        found = services.canonicalize_bootstrap_address("auto", None)
    except ConnectionError:
        raise ConfigError(f"{named}=auto: no Ray cluster runs on this machine: start one (`ray start --head`), "
                          "or unset it to run on an embedded local Ray") from None
    except ValueError as e:
        # Ray's `auto` is RAY_ADDRESS first, where that is set: ray.address=auto in a shell that
        # exports a job server's http:// address (cluster/README does) ended in this ValueError
        # traceback ("Invalid address format")
        raise ConfigError(f"{named}=auto takes RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')} where that is set, "
                          f"which is no cluster address ({e}): unset RAY_ADDRESS to join the cluster last "
                          "started on this machine, or give ray.address=HOST:PORT") from None
    return found or "auto"


def init_ray(cfg: RayConfig | None = None, quiet: bool = False) -> None:
    import ray

    global _embedded
    if ray.is_initialized():
        return
    cap_threads()
    loopback_direct()
    cfg = cfg or RayConfig()
    # stripped, as the config's check reads it: ray.address=" local" passed that check and reached
    # ray.init as a cluster's address ("Invalid address format" traceback), and "HOST:PORT " went
    # unchecked (its port is no number) into ray.init's minutes of retries where nothing answers
    address = (cfg.address or "").strip() or (os.environ.get("RAY_ADDRESS") or "").strip() or None
    named = "ray.address" if (cfg.address or "").strip() else "RAY_ADDRESS"
    if address and address.lower().startswith(("http://", "https://")):
        # the job server's address (cluster/README exports it for `ray job submit`): Ray refuses
        # it in ray.init with a ValueError traceback, after the command's checks and set-up
        raise ConfigError(f"{named}={address} is a Ray dashboard / job-server address (what `ray job submit` "
                          "takes), not a cluster to join: unset it to run on an embedded local Ray, or give "
                          "the cluster's GCS address (host:6379)")
    kwargs = dict(log_to_driver=not quiet, logging_level=logging.WARNING)
    if address and address != "local":
        shown = ""
        if address.lower() == "auto":
            address = find_auto(named)
            # Ray's `auto` is RAY_ADDRESS where that is set (and not auto itself): that cluster was
            # said to be "the cluster last started on this machine"
            whose = ("RAY_ADDRESS's cluster" if os.environ.get("RAY_ADDRESS", "") not in ("", "auto")
                     else "the cluster last started on this machine")
            shown = f"{named}=auto, {whose} ({address})"
        check_answers(address, named, shown=shown)
        ray.init(address=address, **kwargs)
        _embedded = None
        return
    num_cpus = local_cpus(cfg)
    os.environ.setdefault(FREE_OBJECTS_ENV, FREE_OBJECTS_PERIOD_MS)  # a user's own value wins
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    os.environ.setdefault(PREEMPTION_ENV, "0")
    os.environ.setdefault(PROXY_READY_ENV, PROXY_READY_S)
    # read by every Ray worker that imports ray.data, Ray Train's dataset coordinators included,
    # whose console lines Ray forwards to ours: see ray_data_logging.yaml
    os.environ.setdefault(RAY_DATA_LOGGING_ENV, RAY_DATA_LOGGING)
    # the dashboard stays on: it hosts the State API, which Ray Train uses to watch its controller
    # "local" (Ray's word for a new local instance) is this embedded Ray, sized and checked as
    # such; naming it keeps ray.init from joining a RAY_ADDRESS that ray.address=local overrode,
    # and, with no address at all, the cluster a `ray start` on this machine recorded in
    # /tmp/ray/ray_current_cluster (ray.init(address=None) joins that one): there it failed with
    # "When connecting to an existing cluster, num_cpus and num_gpus must not be provided"
    try:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    except (OSError, RuntimeError) as e:
        token_dir = os.path.join(os.path.expanduser("~"), ".ray")
        if isinstance(e, RuntimeError) and "home directory" in str(e) or \
                str(getattr(e, "filename", None) or "").startswith(token_dir):
            # a new local Ray writes its authentication token to ~/.ray/auth_token: a HOME that
            # cannot be written (read-only, a file, a container's user without one) failed in
            # ray.init with a traceback, or a bare "No such file or directory: .../.ray"
            why = getattr(e, "strerror", None) or str(e)
            raise ConfigError(f"the local Ray keeps its authentication token in ~/.ray/auth_token, which cannot be "
                              f"written here ({token_dir}: {why}): set HOME to a writable folder, or give the token "
                              "in RAY_AUTH_TOKEN (a random string, e.g. RAY_AUTH_TOKEN=$(openssl rand -hex 32))") from None
        if "AF_UNIX path length" not in str(e):
            raise
        # Ray's sockets live under $RAY_TMPDIR, else (Linux) $TMPDIR: a long one (a batch job's
        # scratch folder) failed in ray.init with an OSError traceback
        var = "RAY_TMPDIR" if os.environ.get("RAY_TMPDIR") else "TMPDIR"
        raise ConfigError(f"{var}={os.environ.get(var, '')} is too long a path for the local Ray's sockets (a Unix "
                          "socket's path holds at most 107 bytes): set RAY_TMPDIR to a short folder, e.g. "
                          "RAY_TMPDIR=/tmp") from None
    have = ray.cluster_resources()
    _embedded = {"CPU": float(num_cpus), "GPU": float(have.get("GPU", 0.0))}


def local_cpus(cfg: RayConfig | None = None) -> int:
    """The logical CPUs `init_ray(cfg)` gives an embedded local Ray."""
    return (cfg or RayConfig()).num_cpus or max(4, 2 * usable_cores())


def is_embedded() -> bool:
    """Whether the Ray this process uses is one `init_ray` started here (not a cluster's)."""
    return _embedded is not None


def check_fits(asks: dict[str, float], resource: str = "CPU",
               advice: str = "lower them or raise ray.num_cpus", read_tasks: bool = True,
               before_start: bool = False) -> None:
    """Fail now if asks for `resource` ("CPU" or "GPU") that run at once cannot fit the
    embedded Ray (CPUs: keeping one for Ray Data's read tasks, unless `read_tasks` is False:
    Serve's replicas run no Ray Data).

    Ray queues what does not fit rather than failing; on a cluster an autoscaler may add nodes,
    but the embedded Ray never grows, so a pool too big for it would wait forever, silently.
    `asks` maps the config keys behind each ask (e.g. "data.decode_actors x data.decode_cpus")
    to its amount. On a cluster, or a Ray this process did not start, this checks nothing.
    `before_start`: check CPUs against the Ray that `init_ray()` will start (unless RAY_ADDRESS
    names a cluster), for a command with work to do before it starts Ray.
    """
    address = os.environ.get("RAY_ADDRESS") or "local"
    if _embedded is not None:
        have = _embedded[resource]
    elif before_start and resource == "CPU" and address.lower() == "local":  # not joining a cluster
        have = float(local_cpus())
    else:
        return
    reserve = READ_TASK_CPUS if resource == "CPU" and read_tasks else 0.0
    need = sum(asks.values()) + reserve
    if need > have + 1e-9:
        parts = "; ".join(f"{k} = {v:g}" for k, v in asks.items())
        parts += f"; {reserve:g} for Ray Data's read tasks" if reserve else ""
        has = f"{have:g}" + (" (ray.num_cpus)" if resource == "CPU" else "")
        raise ConfigError(f"this run needs {need:g} {resource}s at once ({parts}), but the local Ray has "
                          f"{has}: {advice}, or Ray would wait for {resource}s forever")


def model_pool(section: str, actors: int, cpus: float, gpus: float) -> float:
    """Check that a pool of actors that each load a model (the index's embedders, clip
    editing's scorers) fits the embedded Ray, and return its GPUs per actor: `gpus` < 0 means
    one per actor when the cluster has GPUs, else none."""
    import ray

    check_fits({f"{section}.actors x {section}.actor_cpus": actors * cpus})
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    check_fits({f"{section}.actors x {section}.actor_gpus": actors * gpus}, "GPU",
               advice=f"set {section}.actor_gpus=0 (CPU) or -1 (GPU if there is one)")
    return gpus


class RayDataConsoleFilter(logging.Filter):
    """Ray Data's console filter in the embedded Ray's processes (ray_data_logging.yaml): drops
    what Ray Data itself marks hidden, as its own filter does, and its notice that progress bars
    are off, which only restates `quiet_data_progress` in each process that runs a dataset."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "hide", False) and not str(record.msg).startswith("Progress bars disabled")


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars drown a driver's own progress line, and its one
    console line per execution ("Dataset ... execution finished in N seconds", INFO) lands in the
    middle of it. Its notice that the bars are off says only what this function did, and its
    Parquet reader's two lines on the encoding ratio and reader batch size it estimated, each time
    a manifest is opened, are its own bookkeeping. Other warnings still show, and Ray Data's log
    file keeps its other INFO lines."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.datasource.parquet_datasource").setLevel(logging.WARNING)
