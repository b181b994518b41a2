"""Reading a run directory the way a restart does (local path or s3:// alike)."""

from __future__ import annotations

import json
from typing import Optional

import fsspec


def registered_state(run_dir: str) -> Optional[dict]:
    """The loop state of the latest checkpoint Ray has registered for this run, or None.

    A restart resumes from what `checkpoint_manager_snapshot.json` lists, which can lag a
    checkpoint directory that is already on disk by a moment, so tests read the snapshot.
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    snap = f"{root}/checkpoint_manager_snapshot.json"
    if not fs.exists(snap):
        return None
    latest = json.loads(fs.cat(snap)).get("latest_checkpoint_result")
    if not latest:
        return None
    return json.loads(fs.cat(f"{root}/{latest['checkpoint_dir_name']}/state.json"))
