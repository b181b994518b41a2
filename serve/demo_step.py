"""The serving step of `clipray demo`: index the synthetic videos, serve, query over HTTP.

`serve_demo(export_dir, manifest, out_dir)` runs on the Ray the caller already started (or
starts an embedded one): `clipray index` over every clip of the manifest (sampled as the
export's training run sampled them: `trained_sampling`), the Serve app on
127.0.0.1 (port 8000, or a free one when 8000 is taken), a few caption queries of known test
videos through the real HTTP API (`POST /search`), each printed next to the true video, then the
app is deleted and the command that serves the same index for real is printed.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np


def port(preferred: int = 8000) -> int:
    from serve.__main__ import port_free

    if port_free("127.0.0.1", preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    from serve.__main__ import DIRECT  # the demo's own server: not through $http_proxy

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with DIRECT.open(req, timeout=60) as r:
        return json.loads(r.read())


def _queries(manifest: str, n: int) -> list[dict]:
    """Captions of test-split videos (any split when there is none), one per video."""
    from clipray.manifest import read_manifest

    rows = read_manifest(manifest).to_pylist()
    test = [r for r in rows if r["split"] == "test"] or rows
    seen, out = set(), []
    for r in test:
        if r["video_id"] not in seen:
            seen.add(r["video_id"])
            out.append(r)
    return out[:n]


def ranks_line(report: list[dict], count: int, k: int) -> str:
    """How the queries' true videos ranked among the `count` clips (None: past the top `k`),
    beside what a random ranking averages, (count + 1) / 2, exactly: 48 clips average 24.5,
    which was printed rounded to an even 24."""
    found = sum(r["rank"] is not None and r["rank"] <= 5 for r in report)
    ranks = ", ".join(str(r["rank"] or f">{k}") for r in report)
    return (f"{found}/{len(report)} queries found their video in the top 5 of {count} clips (ranks {ranks}; "
            f"a random ranking would average {(count + 1) / 2:g})")


def true_rank(results: list[dict], video_id: str) -> int | None:
    """The true video's rank among `results` (best score first) as training's evaluation ranks
    a target (`metrics.t2v_ranks`: 1 + the other clips scoring at least as high, so a tie counts
    against the query), not its place in the list; None when it is not among them."""
    from clipray.metrics import t2v_ranks

    ids = [h["video_id"] for h in results]
    if video_id not in ids:
        return None
    return int(t2v_ranks(np.array([[h["score"] for h in results]]), [ids.index(video_id)])[0])


def trained_sampling(export_dir: str) -> list[str]:
    """The index overrides that sample clips and cut captions as the export's training run did
    (its recorded video.fps, video.max_frames, video.slice and max_words): `clipray demo
    data.video.max_frames=4` trains on 4 frames, and its index and queries must use 4 too."""
    from clipray.export import CONFIG, local_dir
    from serve.index import recorded_sampling

    local = local_dir(export_dir)
    if local is not None:
        text = (Path(local) / CONFIG).read_bytes()
    else:  # a run stored in object storage (train.storage_path=s3://...) keeps its export there
        from clipray.manifest import fsspec_path

        fs, root = fsspec_path(export_dir)
        text = fs.cat_file(f"{root.rstrip('/')}/{CONFIG}")
    return [f"{k}={v}" for k, v in recorded_sampling(json.loads(text)).items()]


def serve_demo(export_dir: str, manifest: str, out_dir: str, queries: int = 4) -> list[dict]:
    """Index, serve, query, stop. Returns one dict per query: text, true video, its rank among
    the indexed clips (None past serve.limits.max_k), the top 5 results."""
    from serve import store
    from serve.__main__ import start, stop
    from serve.config import load_app_config
    from serve.index import build_index

    index_dir = str(Path(out_dir) / "index")
    trained = trained_sampling(export_dir)
    cfg = load_app_config(None, [f"checkpoint={export_dir}", f"manifest={manifest}", f"out={index_dir}",
                                 f"serve.port={port()}", "serve.text_encoder.max_replicas=1",
                                 "serve.log_level=WARNING", *trained])
    build_index(cfg)
    t0 = time.perf_counter()
    url = start(cfg)
    print(f"serving at {url} (up in {time.perf_counter() - t0:.1f}s); queries through POST {url}/search:")
    report = []
    # the true video's rank among every indexed clip (as far as the API's k goes), beside the top 5
    count = store.read_meta(index_dir)["count"]
    k = min(cfg.serve.limits.max_k, count)
    try:
        for row in _queries(manifest, queries):
            t1 = time.perf_counter()
            ranked = _post(f"{url}/search", {"text": row["caption"], "k": k})["results"]
            ms = 1000 * (time.perf_counter() - t1)
            rank = true_rank(ranked, row["video_id"])
            hits = ranked[:5]
            print(f"  {row['caption']!r}  (true video {row['video_id']}: "
                  f"{f'rank {rank}' if rank else f'not in the top {k}'} of {count} clips, {ms:.0f} ms)")
            for i, h in enumerate(hits, 1):
                mark = "  <- true video" if h["video_id"] == row["video_id"] else ""
                print(f"      {i}. {h['video_id']}  score {h['score']:.3f}{mark}")
            report.append({"text": row["caption"], "video_id": row["video_id"], "rank": rank,
                           "latency_ms": ms, "results": hits})
    finally:
        stop(cfg)
    # the index records the clip sampling clipray serve uses; the caption length is a serve setting
    words = (f" serve.max_words={cfg.serve.max_words}"
             if cfg.serve.max_words != load_app_config(None).serve.max_words else "")
    print(f"{ranks_line(report, count, k)}. Serve it for real with:\n"
          f"  clipray serve serve/configs/demo.yaml out={index_dir}{words}\n"
          f"  then open http://127.0.0.1:8000/ (search page) or http://127.0.0.1:8000/docs (API)")
    return report
