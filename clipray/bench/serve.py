"""`clipray bench serve`: the retrieval API under load, and the index at 1M x 512.

API part (everything on loopback, bounded request counts):
  - model: `clip4clip_vitb32_meanP` with random weights (a real-size ViT-B/32 text tower: latency
    does not depend on the weights), exported and indexed over synthetic clips by `clipray index`;
  - the app from `serve.app`, text encoder and searcher fixed at 1 replica each, run twice:
    batched (`max_batch_size` 32) and unbatched (`max_batch_size=1`), same `max_ongoing_requests`;
  - an asyncio load generator (aiohttp, N clients each sending back-to-back requests) prints
    p50/p95/p99 latency and throughput for POST /search at 1, 8, 32 clients, and POST
    /encode/text at 32 clients;
  - Serve overhead: /encode/text at 1 client, unbatched (no batch wait), against the same encoder
    called in-process.

Index part: 1M x 512 float32 vectors that keep the structure of real embeddings: the clips and
captions of the synthetic set embedded by a trained tiny model (`serve.smoke_model.fit_tiny`,
64-d), lifted to 512-d by a fixed random orthonormal map, and expanded to 1M by random convex
mixtures of 3 clip embeddings plus isotropic noise (random vectors would make approximate indexes
look far worse than they are on embeddings). Queries are caption embeddings (text tower) lifted
the same way. Reported: single-query latency and QPS of exact search (IndexFlatIP) and of
IVF-SQ8 (4x compressed) at several nprobe, their recall@10 against exact (as `clipray index`
counts it, `serve.store.recall_at_k`), batched exact search (64 queries per call), and the QPS
of the `Searcher` deployment under 32 concurrent callers, batched against `max_batch_size=1`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipray.bench import scratch_dir
from clipray.cli import at_least


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def _load(url: str, clients: int, total: int, body: Any) -> dict:
    """`clients` concurrent callers, `total` requests in all; latency percentiles + req/s."""
    import aiohttp

    lat, fails, left = [], 0, [total]
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def one(i: int) -> None:
            nonlocal fails
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                async with s.post(url, json=body(i)) as r:
                    await r.read()
                    fails += r.status != 200
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    ms = [1000 * x for x in lat]
    return {"clients": clients, "requests": len(lat), "failed": fails, "rps": len(lat) / wall,
            "p50": _pct(ms, 50), "p95": _pct(ms, 95), "p99": _pct(ms, 99)}


async def _handle_load(method: Any, clients: int, total: int, arg: Any) -> dict:
    """The same bounded load through a Serve handle (no HTTP): what the deployment itself does."""
    lat, left = [], [total]

    async def one(i: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            a = arg(i)
            await method.remote(*(a if isinstance(a, tuple) else (a,)))
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ms = [1000 * x for x in lat]
    return {"clients": clients, "requests": len(lat), "failed": 0, "rps": len(lat) / wall,
            "p50": _pct(ms, 50), "p95": _pct(ms, 95), "p99": _pct(ms, 99)}


def _row(name: str, r: dict) -> str:
    return (f"{name:34} {r['clients']:>7} {r['requests']:>8} {r['rps']:>8.1f} {r['p50']:>8.1f} "
            f"{r['p95']:>8.1f} {r['p99']:>8.1f} {r['failed']:>6}")


def api_bench(work: Path, scale: float) -> dict:
    from ray import serve

    from clipray.export import load_export, save_export
    from clipray.models import create_model
    from clipray.synth import generate
    from serve.__main__ import start, stop
    from serve.config import load_app_config
    from serve.demo_step import port
    from serve.index import build_index

    export = work / "vitb32_export"
    if not (export / "config.json").exists():
        save_export(create_model("clip4clip_vitb32_meanP"), export)
    synth = work / "synth"
    if not (synth / "synth.json").exists():
        generate(synth, videos=24, seed=0)
    queries = [
        f"a {c} {s} moves {d}" for c in ("red", "blue", "green", "yellow") for s in ("square", "circle")
        for d in ("left", "up")]
    base = [f"checkpoint={export}", f"manifest={synth / 'manifest.parquet'}", f"out={work / 'api_index'}",
            "video.max_frames=4", f"serve.port={port()}", "serve.app_name=clipray-bench",
            "serve.ingress.max_ongoing_requests=256", "serve.ingress.num_cpus=0.1"]
    for d in ("text_encoder", "searcher", "video_encoder"):
        base += [f"serve.{d}.min_replicas=1", f"serve.{d}.max_replicas=1", f"serve.{d}.num_cpus=0.1",
                 f"serve.{d}.max_ongoing_requests=64"]
    if not (work / "api_index" / "index.json").exists():
        build_index(load_app_config(None, base), quiet=True)
    n = lambda k: max(8, int(k * scale))  # noqa: E731
    search = lambda i: {"text": queries[i % len(queries)], "k": 10}  # noqa: E731
    encode = lambda i: {"text": queries[i % len(queries)]}  # noqa: E731
    out: dict = {}
    header = (f"{'endpoint (mode)':34} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'p99 ms':>8} {'failed':>6}")
    print(header + "\n" + "-" * len(header), flush=True)
    for mode, bs in (("batched", 32), ("max_batch_size=1", 1)):
        cfg = load_app_config(None, base + [f"serve.text_encoder.max_batch_size={bs}",
                                            f"serve.searcher.max_batch_size={bs}"])
        url = start(cfg)
        asyncio.run(_load(f"{url}/search", 4, 16, search))  # warm-up: first calls pay lazy init
        res = {}
        for c, total in ((1, n(40)), (8, n(160)), (32, n(320))):
            res[f"search@{c}"] = r = asyncio.run(_load(f"{url}/search", c, total, search))
            print(_row(f"POST /search ({mode})", r), flush=True)
        res["encode@32"] = r = asyncio.run(_load(f"{url}/encode/text", 32, n(320), encode))
        print(_row(f"POST /encode/text ({mode})", r), flush=True)
        res["encode@1"] = r = asyncio.run(_load(f"{url}/encode/text", 1, n(60), encode))
        print(_row(f"POST /encode/text ({mode})", r), flush=True)
        text = serve.get_deployment_handle("TextEncoder", app_name=cfg.serve.app_name).encode
        res["handle@32"] = r = asyncio.run(_handle_load(text, 32, n(320), lambda i: queries[i % len(queries)]))
        print(_row(f"TextEncoder handle ({mode})", r), flush=True)
        out[mode] = res
        stop(cfg)
    out["direct_encode_ms"] = _direct_encode_ms(load_export(export), queries, n(60))
    b, u = out["batched"], out["max_batch_size=1"]
    # the unbatched app: in the batched one a lone request also waits out the batch timeout,
    # which is batching's cost (the lines above), not the proxy's, ingress's or handle's
    http = u["encode@1"]["p50"]
    out["serve_overhead_share"] = (http - out["direct_encode_ms"]) / http
    print(f"\nencoder batching at 32 clients: {b['handle@32']['rps'] / u['handle@32']['rps']:.1f}x the "
          f"throughput of max_batch_size=1 through a handle; over HTTP "
          f"{b['encode@32']['rps'] / u['encode@32']['rps']:.1f}x on /encode/text, "
          f"{b['search@32']['rps'] / u['search@32']['rps']:.1f}x on /search")
    print(f"Serve overhead at 1 client (max_batch_size=1): /encode/text p50 {http:.1f} ms vs the same "
          f"encoder in-process {out['direct_encode_ms']:.1f} ms -> {100 * out['serve_overhead_share']:.0f}% of the latency "
          "is HTTP proxy + ingress + handle routing", flush=True)
    return out


def _direct_encode_ms(model: Any, queries: list[str], n: int) -> float:
    """The TextEncoder's own call (same tokenizer, one thread like the replica), in-process."""
    import torch

    from serve.deployments import tokenizer

    tok, threads = tokenizer(model, 32), torch.get_num_threads()
    torch.set_num_threads(1)  # Ray gives a replica with num_cpus < 1 OMP_NUM_THREADS=1
    times = []
    try:
        with torch.no_grad():
            for i in range(n):
                t0 = time.perf_counter()
                model.encode_text(tok([queries[i % len(queries)]]))
                times.append(1000 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[5:] or times)


# ---- index at 1M x 512 ----------------------------------------------------------------------------
def realish_vectors(work: Path, n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1M-scale base vectors + caption queries from a trained model's embeddings (see docstring)."""
    import open_clip
    import torch

    from clipray.config import VideoConfig
    from clipray.export import load_export
    from clipray.synth import generate
    from serve.smoke_model import fit_tiny, load_clips

    synth = work / "synth_120"
    if not (synth / "synth.json").exists():
        generate(synth, videos=120, seed=1)
    export = work / "tiny_export"
    manifests = [str(synth / "manifest.parquet"), str(synth / "events.parquet")]
    if not (export / "config.json").exists():
        fit_tiny(manifests, export, steps=300)  # 120 videos need more steps than the tests' 24
    model = load_export(export)
    frames, masks, captions = load_clips(manifests, VideoConfig(fps=2.0, max_frames=8, size=model.image_size))
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=32)
    with torch.no_grad():
        clips = model.encode_video(model.normalize(torch.from_numpy(frames)), torch.from_numpy(masks).bool()).numpy()
        texts = model.encode_text(tok(sorted(set(captions)))).numpy()
    rng = np.random.default_rng(seed)
    lift, _ = np.linalg.qr(rng.standard_normal((dim, clips.shape[1])))  # [dim, 64] orthonormal columns
    lift = lift.T.astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        pick = rng.integers(0, len(clips), (m, 3))
        w = rng.dirichlet((2.0, 1.0, 1.0), m).astype(np.float32)
        mix = np.einsum("mk,mkd->md", w, clips[pick]) @ lift
        mix /= np.linalg.norm(mix, axis=1, keepdims=True)
        x[i : i + m] = mix + 0.6 / np.sqrt(dim) * rng.standard_normal((m, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    qi = rng.integers(0, len(texts), queries)
    q = texts[qi] @ lift + 0.3 / np.sqrt(dim) * rng.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


def _single_ms(index: Any, q: np.ndarray, k: int = 10) -> float:
    times = []
    for v in q:
        t0 = time.perf_counter()
        index.search(v[None], k)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def index_bench(work: Path, n: int, dim: int, searcher: bool) -> dict:
    import faiss

    from serve import store

    t0 = time.perf_counter()
    x, q = realish_vectors(work, n, dim, 200)
    print(f"\n{n:,} x {dim} vectors built in {time.perf_counter() - t0:.0f}s; faiss threads "
          f"{faiss.omp_get_max_threads()}", flush=True)
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    out: dict = {"n": n, "dim": dim}
    single = _single_ms(exact, q[:20])
    faiss.cvar.distance_compute_blas_threshold = 4  # as the Searcher sets it
    t1 = time.perf_counter()
    exact.search(q[:64], 10)
    batch64 = time.perf_counter() - t1
    t1 = time.perf_counter()
    exact.search(q[:200], 10)
    batch200 = time.perf_counter() - t1
    out["flat"] = {"single_ms": single, "single_qps": 1000 / single, "batch64_qps": 64 / batch64,
                   "batch200_qps": 200 / batch200,
                   "recall@10": 1.0, "bytes_per_vector": 4 * dim}
    print(f"{'index':28} {'single ms':>10} {'single QPS':>11} {'recall@10':>10} {'B/vector':>9}")
    print(f"{'flat (exact IP)':28} {single:>10.1f} {1000 / single:>11.1f} {1.0:>10.3f} {4 * dim:>9}")
    print(f"{'flat, 64 queries per call':28} {1000 * batch64 / 64:>10.1f} {64 / batch64:>11.1f} "
          f"{'':>10} (batched = {64 / batch64 * single / 1000:.1f}x single-query QPS)")
    print(f"{'flat, 200 queries per call':28} {1000 * batch200 / 200:>10.1f} {200 / batch200:>11.1f} "
          f"{'':>10} (batched = {200 / batch200 * single / 1000:.1f}x single-query QPS)", flush=True)
    t1 = time.perf_counter()
    ivf, params = store.build_faiss(x, "ivf_sq8", nlist=1024)
    print(f"ivf_sq8 nlist {params['nlist']} built in {time.perf_counter() - t1:.0f}s", flush=True)
    for nprobe in (8, 16, 32, 64):
        store.set_search_params(ivf, nprobe=nprobe)
        # recall@10 as `clipray index` measures it (docs/serving.md): a clip counts when its exact
        # score reaches the exact 10th, so of near-duplicate clips tied there any one is right;
        # counted by id, an exact search that kept another of them was a miss
        rec = store.recall_at_k(ivf, exact, q)["recall@10"]
        ms = _single_ms(ivf, q[:100])
        out[f"ivf_sq8_nprobe{nprobe}"] = {"single_ms": ms, "single_qps": 1000 / ms, "recall@10": rec,
                                          "bytes_per_vector": dim + 8, "latency_vs_exact": ms / single}
        print(f"{'ivf_sq8 nprobe ' + str(nprobe):28} {ms:>10.2f} {1000 / ms:>11.1f} {rec:>10.3f} {dim + 8:>9}",
              flush=True)
    del ivf
    if searcher:
        out["searcher"] = searcher_bench(work, x, exact, q)
    return out


def flat_index_dir(d: Path, x: np.ndarray, exact: Any) -> Path:
    """An index folder the Searcher serves: the exact index of `x`, one clip per vector."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve import store

    (d / store.EMB_DIR).mkdir(parents=True, exist_ok=True)
    n = len(x)
    pq.write_table(pa.table({"row_id": np.arange(n), "video_id": pa.array(["v"] * n), "start": np.zeros(n),
                             "end": np.ones(n), "path": pa.array(["/nonexistent"] * n)}),
                   d / store.EMB_DIR / "part-00000.parquet")
    store.save_faiss(d, exact)
    store.write_meta(d, {"format": store.FORMAT, "kind": "flat", "dim": x.shape[1], "count": n, "search": {}})
    return d


def searcher_bench(work: Path, x: np.ndarray, exact: Any, q: np.ndarray) -> dict:
    """The Searcher deployment over the 1M exact index: 32 concurrent callers, batched vs 1."""
    from ray import serve

    from serve.deployments import Searcher

    d = flat_index_dir(work / "index_1m", x, exact)
    out = {}
    for bs in (32, 1):
        # 2 CPUs reserved: faiss uses both cores (its OpenMP default), as in the figures above
        app = Searcher.options(max_ongoing_requests=32, ray_actor_options={"num_cpus": 2}).bind(
            str(d), {"max_batch_size": bs, "batch_wait_timeout_s": 0.03})
        h = serve.run(app, name="clipray-bench-searcher", route_prefix=None)
        h.search.remote(q[0], 10).result()
        # 32 closed-loop callers (each sends its next query when its answer is back)
        r = asyncio.run(_handle_load(h.search, 32, 32 if bs == 1 else 256, lambda i: (q[i % len(q)], 10)))
        calls, dt = r["requests"], r["requests"] / r["rps"]
        sizes = h.info.remote().result()["batch_sizes"][1:]
        out[f"max_batch_size={bs}"] = {"qps": calls / dt, "mean_batch": float(np.mean(sizes)) if sizes else 1.0}
        print(f"Searcher deployment, {len(x):,} exact, 32 concurrent callers, max_batch_size={bs}: "
              f"{calls / dt:.1f} QPS (mean batch {out[f'max_batch_size={bs}']['mean_batch']:.1f})", flush=True)
        serve.delete("clipray-bench-searcher")
    out["speedup"] = out["max_batch_size=32"]["qps"] / out["max_batch_size=1"]["qps"]
    print(f"Searcher batching: {out['speedup']:.1f}x the QPS of single-query search", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=at_least(1), default=1_000_000)
    ap.add_argument("--dim", type=at_least(64), default=512,
                    help="vector width: the tiny model's 64-d embeddings lifted to it (so 64 or more)")
    ap.add_argument("--scale", type=at_least(0.01, float), default=1.0, help="multiply the request counts")
    ap.add_argument("--skip-api", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-searcher", action="store_true", help="index part without the Serve Searcher")
    ap.add_argument("--workdir", default=None,
                    help="models, clips and indexes, kept (default: a temp dir, removed at the end)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.skip_api and args.skip_index:
        ap.error("--skip-api and --skip-index leave nothing to run")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # else lost after the whole run
        ap.error(f"--json {args.json}: no folder {Path(args.json).resolve().parent} to write it in")

    from clipray.runtime import init_ray, quiet_data_progress

    with scratch_dir("clipray-bench-serve-", args.workdir) as work:
        init_ray(quiet=True)
        quiet_data_progress()
        out = {}
        if not args.skip_api:
            out["api"] = api_bench(work, args.scale)
        if not args.skip_index:
            out["index"] = index_bench(work, args.vectors, args.dim, not args.skip_searcher)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
