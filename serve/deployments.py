"""The model and index deployments behind the HTTP ingress (Ray Serve, one class each).

    TextEncoder    text -> L2-normalised vector; `@serve.batch` stacks concurrent queries
    VideoEncoder   uploaded clip bytes -> decoded (clipray.video, in a thread) -> vector; the
                   decode is per request, the model call is batched
    Searcher       the faiss index + clip metadata; concurrent queries become ONE search call
                   over a [B, D] query matrix (faiss is memory-bound: a batch costs little more
                   than one query)
    Reranker       optional: a tightTransf cross-encoder that re-scores the top candidates of
                   the loose index, from frame features stored at index time

Model calls and searches run on the replica's event loop, blocking it: requests that arrive
meanwhile wait in Ray's queue and enter the next batch together when the loop is free. Running
them in a worker thread instead was measured to make batches of 1 (the forward pass and the
request path fight over the GIL, so requests trickle in one by one); only the per-request video
decode runs in a thread.

Batch sizes and wait timeouts come from config (`set_max_batch_size` at start-up), so one code
path serves both the batched app and the `max_batch_size=1` baseline of `clipray bench serve`.
Requests that carry bad input never reach here: the ingress validates them. An upload that
turns out not to be a video is answered with `{"error": reason}`, not an exception, so one bad
clip cannot fail the other requests of its batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import tempfile
from typing import Any, Optional

import numpy as np
from ray import serve

from clipray.config import ConfigError, VideoConfig


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _configure(method: Any, batch: dict) -> None:
    method.set_max_batch_size(int(batch["max_batch_size"]))
    method.set_batch_wait_timeout_s(float(batch["batch_wait_timeout_s"]))


def _load(export_dir: str, device: str, fingerprint: str) -> Any:
    """The export, checked to hold the weights the index was built with (`fingerprint`; "" is
    not checked). The app checks its exports when it starts; a replica starts later too (an
    autoscaled or a restarted one), and an export written again at that path since (a run
    trained anew under the same name, a clip editing round) gave its queries vectors of another
    model than the index's and the other replicas', without a word."""
    from clipray.export import load_export
    from serve import store

    model = load_export(export_dir, device)
    if fingerprint and store.fingerprint(export_dir) != fingerprint:  # after the load: what was loaded or newer
        raise ConfigError(f"{export_dir} now holds other weights than the index was built with (exported "
                          "again since this app started): its vectors would not match; restart the app "
                          "with checkpoint= an export of the index's weights")
    return model


def tokenizer(model: Any, max_words: int) -> Any:
    """open_clip's tokenizer, cut to the longest caption of each batch.

    The text tower is causal and pools at the end-of-text token, so trailing padding changes
    nothing: a 6-word query runs 8 positions instead of 32, and a single query becomes
    memory-bound (weights streamed once for a few rows), which is what batching then amortises.
    """
    import open_clip

    from clipray.pipeline import cache_trimmer

    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=min(max_words, model.context_length))
    trim = cache_trimmer(tok)

    def tokenize(texts: list[str]) -> Any:
        trim()  # each query of new words (a client's random strings) grew the replica's memory
        t = tok(texts)
        # up to the last non-zero column (the longest caption's end-of-text token), not the
        # count of non-zero tokens: id 0 is also a real token ("!" before another symbol, as
        # in "wow!("), and a count cut such a query's end-of-text token off
        used = (t != 0).any(0).nonzero()
        return t[:, : max(2, int(used.max()) + 1 if len(used) else 0)]

    return tokenize


@serve.deployment
class TextEncoder:
    def __init__(self, export_dir: str, max_words: int, batch: dict, num_gpus: float = 0.0, fingerprint: str = ""):
        self.model = _load(export_dir, _device(num_gpus), fingerprint)
        self.tokenize = tokenizer(self.model, max_words)
        _configure(self.encode_batch, batch)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, texts: list[str]) -> list[Optional[np.ndarray]]:
        """Each text's vector; None for a text the tokenizer cleans to no words (`&nbsp;`, a
        control character), which was answered as if it were the empty text."""
        import torch

        from clipray.pipeline import wordless

        self.batch_sizes = (self.batch_sizes + [len(texts)])[-1000:]
        tokens = self.tokenize(texts)
        empty = wordless(tokens, self.tokenize).tolist()
        with torch.no_grad():  # on the event loop: see the module docstring
            vectors = self.model.encode_text(tokens).float().cpu().numpy()
        return [None if e else v for v, e in zip(vectors, empty)]

    async def encode(self, text: str) -> np.ndarray:
        return await self.encode_batch(text)

    def stats(self) -> dict:
        """Recent batch sizes and this replica's pid (tests and the benchmark read them)."""
        return {"pid": os.getpid(), "batch_sizes": list(self.batch_sizes)}


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file size limit


class NotStored(Exception):
    """The upload's temporary copy could not be written (args[0]: the OSError)."""


MAX_UPLOAD_PIXELS = 3840 * 2160  # an uploaded clip's frame, at most (4K UHD)


@serve.deployment
class VideoEncoder:
    def __init__(self, export_dir: str, video: dict, batch: dict, num_gpus: float = 0.0, fingerprint: str = ""):
        self.device = _device(num_gpus)
        self.model = _load(export_dir, self.device, fingerprint)
        self.video = dataclasses.replace(VideoConfig(**video), size=self.model.image_size)
        _configure(self.embed_batch, batch)

    def _decode(self, data: bytes) -> Any:
        from clipray.video import SkipClip, decode_clip_safe, frame_size

        # decord and PyAV both take a path; the upload lives only for this call
        try:
            f = tempfile.NamedTemporaryFile(suffix=".mp4")
        except OSError as e:
            raise NotStored(e) from None
        with f:
            try:
                f.write(data)
                f.flush()
            except OSError as e:
                raise NotStored(e) from None
            # frames are decoded whole before they are scaled down: an upload of 8 frames at
            # 8192x8192 (194 KB) took 4.9 GB, and a few at once would take the replica down
            w, h = frame_size(f.name)
            if w * h > MAX_UPLOAD_PIXELS:
                raise SkipClip(f"its frames are {w}x{h}, over the {MAX_UPLOAD_PIXELS:,} pixels (3840x2160) an upload "
                               "may have: scale it down")
            try:
                return decode_clip_safe(f.name, None, None, self.video)
            except SkipClip as e:  # the reason names the file: the client's is "the upload", not our temp path
                raise SkipClip(e.reason.replace(f.name, "the upload")) from None

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def embed_batch(self, clips: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        import torch

        frames = torch.from_numpy(np.stack([c[0] for c in clips])).to(self.device)
        mask = torch.from_numpy(np.stack([c[1] for c in clips])).to(self.device).bool()

        with torch.no_grad():
            return list(self.model.encode_video(self.model.normalize(frames), mask).float().cpu().numpy())

    async def encode(self, data: bytes) -> dict:
        from clipray.video import SkipClip

        try:
            clip = await asyncio.to_thread(self._decode, data)
        except SkipClip as e:
            return {"error": e.reason}
        except NotStored as e:  # this replica's disk (full, read-only) was a 500 with no word
            err = e.args[0]
            return {"error": os.strerror(err.errno) if err.errno else str(err),
                    "status": 507 if err.errno in NO_ROOM else 503}
        return {"embedding": await self.embed_batch((clip.frames, clip.mask))}


# How far apart faiss's batched (BLAS) product may score two copies of one clip: a few float32
# ulps (1-2 at a score of 1 were seen); a clip this close to the k-th is searched past
FLAT_NOISE = 1e-5


@serve.deployment
class Searcher:
    def __init__(self, index_dir: str, batch: dict):
        import faiss

        from serve import store

        # faiss scans the database once per query below 20 queries; from a few on, one BLAS
        # matrix product over the whole batch streams the (memory-bound) database once
        faiss.cvar.distance_compute_blas_threshold = 4
        self.meta = store.read_meta(index_dir)
        self.index = store.load_faiss(index_dir, self.meta)
        # the clips' columns stay Arrow arrays, read per result: as Python lists (an object per
        # value) they took about three times the memory in every replica, 0.7 GB for 3M clips
        t = store.read_table(index_dir, store.META_COLUMNS)
        if t.num_rows < self.index.ntotal:  # a part left out of a copy: ids faiss returns had no clip (500s)
            raise ConfigError(f"{index_dir}: its {store.EMB_DIR}/ parts hold {t.num_rows} clips where "
                              f"{store.FAISS} holds {self.index.ntotal}: copy the whole index folder again")
        # more: an append writing its faiss index now (or stopped before it), whose new part is
        # written first; its clips are not in the faiss index yet (the Reranker leaves them out
        # too). A replica started meanwhile (`clipray serve`, an autoscaled or restarted one)
        # was refused, saying to copy the index folder again
        t = t.slice(0, self.index.ntotal)
        self.video_id, self.start, self.end, self.path = (t.column(c) for c in ("video_id", "start", "end", "path"))
        # an ivf_pq index with index.refine re-scores refine x k candidates exactly: how many it
        # looks at grows with k, and a query's answer must not depend on the k of the others
        # it is batched with
        self.k_shapes_answer = hasattr(self.index, "k_factor")
        # a flat index scores a batch of 4 or more queries with one BLAS product, whose rounding
        # hangs on a clip's place in the index: two copies of one video scored 1 ulp apart, and
        # were listed by that, not by clip id (`search_many` scores its hits again, exactly)
        self.flat = isinstance(self.index, faiss.IndexFlat)
        _configure(self.search_batch, batch)
        self.batch_sizes: list[int] = []

    def _row(self, i: int, score: float) -> dict:
        return {"clip_id": int(i), "video_id": self.video_id[i].as_py(), "score": float(score),
                "start": self.start[i].as_py(), "end": self.end[i].as_py()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def search_batch(self, queries: list[tuple[np.ndarray, int]]) -> list[list[dict]]:
        self.batch_sizes = (self.batch_sizes + [len(queries)])[-1000:]
        return self.search_many(queries)

    def search_many(self, queries: list[tuple[np.ndarray, int]]) -> list[list[dict]]:
        """Each (vector, k)'s top-k, as that query alone gets them: one faiss call over the
        batch at its largest k where the top k of a deeper search are the same, else one call
        per distinct k (a batched k=5 query of an ivf_pq index was re-scored among the
        candidates of the batch's k=100 query, another answer than it got alone).

        Equal scores are listed by clip id, the lower first. faiss lists tied clips in no set
        order, and where clips tie at the last place it keeps any of them (which hung on k and
        on the k of the queries batched with it). So where the deepest clip returned ties with
        a query's k-th (each is searched one deeper than its k), that query is searched again
        twice as deep, until a clip scores below its k-th (or every clip is returned): then every
        clip tied with the k-th is among those returned, and sorting by (score, clip id) gives
        the same answer for any k. A flat index's hits are scored again one clip at a time (in
        float64, rounded to float32), so that copies of a clip score alike wherever they stand,
        and a clip within `FLAT_NOISE` of the k-th counts as tied with it."""
        q = np.ascontiguousarray(np.stack([v for v, _ in queries]), dtype=np.float32)
        n = self.index.ntotal
        ks = np.array([min(k, n) for _, k in queries])
        # the most clips a query can get back: all of them, or its refine x k candidates
        most = np.minimum((self.index.k_factor * ks).astype(int), n) if self.k_shapes_answer else np.full_like(ks, n)
        # one deeper than asked: the common case, no tie at the k-th place, takes one search
        deep = np.minimum(ks + 1, most) if self.k_shapes_answer else np.full_like(ks, min(int(ks.max()) + 1, n))
        found: list = [None] * len(queries)  # (scores, ids) of each query
        for k, d in set(zip(ks.tolist(), deep.tolist())):
            rows = np.flatnonzero((ks == k) & (deep == d))
            scores, ids = self._search(q[rows], d, most[rows[0]])
            for r, s, i in zip(rows, scores, ids):
                found[r] = (s, i)
        out = []
        for j, k in enumerate(ks):
            s, i = found[j]
            # (a k-th place left empty, -1, as an IVF index's few probed lists leave it, ties nothing)
            while (k and len(s) < most[j] and i[k - 1] >= 0 and i[-1] >= 0
                   and s[-1] >= s[k - 1] - (FLAT_NOISE if self.flat else 0.0)):
                s, i = (a[0] for a in self._search(q[j:j + 1], min(2 * len(s), most[j]), most[j]))
            if self.flat:
                i = i[i >= 0]
                s = (self.index.reconstruct_batch(i).astype(np.float64) @ q[j].astype(np.float64)).astype(np.float32)
            hits = sorted((-float(x), int(c)) for c, x in zip(i, s) if c >= 0)
            out.append([self._row(c, -x) for x, c in hits[:k]])
        return out

    def _search(self, q: np.ndarray, depth: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's top `depth` for each query. An ivf_pq index with index.refine re-scores as
        many candidates as its k asks (`candidates`, refine x k), however deep this goes: its
        tied copies of a video at the k-th place are then all returned, as the other kinds
        return them, instead of the one faiss happened to keep (the highest clip id, always)."""
        depth = int(depth)  # faiss's wrapper takes a Python int, not numpy's
        if not self.k_shapes_answer:
            return self.index.search(q, depth)
        import faiss

        # faiss takes int(depth x k_factor) candidates: the half keeps float error from losing one
        params = faiss.IndexRefineSearchParameters(k_factor=(candidates + 0.5) / depth)
        return self.index.search(q, depth, params=params)

    async def search(self, vector: np.ndarray, k: int) -> list[dict]:
        return await self.search_batch((vector, k))

    def clip_path(self, clip_id: int) -> Optional[str]:
        """The indexed file of a clip id, or None: the only way a file is ever chosen."""
        return self.path[clip_id].as_py() if 0 <= clip_id < len(self.path) else None

    def info(self) -> dict:
        return {"clips": len(self.path), "kind": self.meta["kind"], "dim": self.meta["dim"],
                "recall": self.meta.get("recall"), "pid": os.getpid(),
                "batch_sizes": list(self.batch_sizes)}


@serve.deployment
class Reranker:
    """tightTransf over the loose index's candidates: score(text, clip) from stored features."""

    def __init__(self, export_dir: str, index_dir: str, max_words: int, batch: dict, num_gpus: float = 0.0,
                 fingerprint: str = ""):
        self.device = _device(num_gpus)
        self.model = _load(export_dir, self.device, fingerprint)
        self.tokenize = tokenizer(self.model, max_words)
        self.index_dir = index_dir
        self._read_features()
        _configure(self.rerank_batch, batch)

    def _read_features(self) -> None:
        import torch

        from serve import store

        count = store.read_meta(self.index_dir)["count"]
        stored = store.read_rerank(self.index_dir, count)
        if stored is None:  # a copy of the index without its rerank/ folder (`cp` without -r)
            raise ConfigError(f"{self.index_dir}: its index.json names a re-ranker and it has no "
                              f"{store.RERANK_DIR}/ parts: copy the whole index folder again")
        feats, mask = stored
        self.feats, self.mask = torch.from_numpy(feats), torch.from_numpy(mask).bool()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def rerank_batch(self, reqs: list[tuple[str, list[int]]]) -> list[list[float]]:
        return self.rerank_many(reqs)

    def rerank_many(self, reqs: list[tuple[str, list[int]]]) -> list[list[float]]:
        """Each (text, candidate ids)'s scores. Candidates past the features this replica read
        come from a Searcher replica started after an append to the index (autoscaled, or
        restarted): the features are read again, with the appended clips'. Indexed with them as
        they were, the batch failed with an IndexError, a 500 for every request in it."""
        if max((max(ids) for _, ids in reqs if len(ids)), default=-1) >= len(self.feats):
            self._read_features()
        return score_candidates(self.model, self.tokenize, self.feats, self.mask, reqs)

    async def rerank(self, text: str, ids: list[int]) -> list[float]:
        return await self.rerank_batch((text, ids))


def score_candidates(model: Any, tokenize: Any, feats: Any, mask: Any,
                     reqs: list[tuple[str, list[int]]]) -> list[list[float]]:
    """Cross-encoder scores of each (text, candidate row ids) request; texts encoded together.
    Candidates of the same stored features (a video indexed twice) are scored once: scored in
    one batch, the copies came out ~1e-9 apart by their places in it, and were listed by that,
    not by clip id."""
    import torch

    dev, dtype = model.logit_scale.device, model.logit_scale.dtype
    with torch.no_grad():
        text = model.encode_text(tokenize([t for t, _ in reqs]))
        out = []
        for j, (_, ids) in enumerate(reqs):
            if not len(ids):
                out.append([])
                continue
            idx = torch.as_tensor(ids, dtype=torch.long)
            f, m = feats[idx], mask[idx]
            bits = torch.cat([f.flatten(1).contiguous().view(torch.int16), m.flatten(1).to(torch.int16)], 1)
            _, same = torch.unique(bits, dim=0, return_inverse=True)  # same[i]: candidate i's distinct features
            first = torch.full((int(same.max()) + 1,), len(ids), dtype=torch.long)
            first = first.scatter_reduce(0, same, torch.arange(len(ids)), "amin")
            s = model.similarity(text[j : j + 1], f[first].to(dev, dtype), m[first].to(dev))
            out.append(s[0].float().cpu()[same].tolist())
    return out
