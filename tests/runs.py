"""Reading a run directory the way a restart does (local path or s3:// alike), stopping a
training run at its first checkpoint, and an index's embedding column as one array."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from typing import Callable, Optional

import fsspec
import numpy as np
import pyarrow as pa


def registered_state(run_dir: str) -> Optional[dict]:
    """The loop state of the latest checkpoint Ray has registered for this run, or None.

    A restart resumes from what `checkpoint_manager_snapshot.json` lists, which can lag a
    checkpoint directory that is already on disk by a moment, so tests read the snapshot.
    Ray rewrites the snapshot in place: a read that lands mid-write sees it empty or cut short,
    which counts as "not registered yet" (seen once in a full test run, where it failed the
    resume test).
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    snap = f"{root}/checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(fs.cat(snap)).get("latest_checkpoint_result")
        return json.loads(fs.cat(f"{root}/{latest['checkpoint_dir_name']}/state.json")) if latest else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stop_at_first_checkpoint(proc: subprocess.Popen, run_dir: str, timeout_s: float,
                             log: Callable[[], str]) -> None:
    """Wait until the training run `proc` (started with `start_new_session=True`) has a
    registered checkpoint, then kill its whole process group: the user's Ctrl-C, harder.

    The group is killed however the wait ends, a failed one included: a run left behind keeps
    the session's shared Ray CPUs and starves every test after it (seen: the next test hung).
    """
    try:
        deadline = time.time() + timeout_s
        while registered_state(run_dir) is None:
            assert proc.poll() is None, log()[-3000:]
            assert time.time() < deadline, f"no checkpoint within {timeout_s:g} s"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column of an index's table (`serve.store.read_table`) as [N, D] float32,
    read straight from the parts: a reference for the index's own readers."""
    col = table.column("embedding").combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), len(col[0]))
