"""The index directory: what `clipray index` writes and the Searcher / Reranker read.

    out/embeddings/part-NNNNN.parquet  row_id, video_id, start, end, path, embedding (float32)
                                       one part per `clipray index` run (appends add a part)
    out/rerank/part-NNNNN.npz          optional: row_id, frame features [n, T, D] fp16, mask
                                       of a tightTransf export (the re-ranker's inputs)
    out/index.faiss                    faiss index over all embeddings; faiss id == row_id
    out/replaced/part-NNNNN.parquet    row_id, embedding: clips embedded again (their file was
                                       written anew); a later part's vector replaces a row's
    out/files/part-NNNNN.parquet       path, size, mtime_ns: each video file as its clips were
                                       embedded (a later part's signature replaces a path's)
    out/index.json                     export path (absolute, and relative to out) + fingerprint,
                                       dim, count, kind, search parameters, recall@10 vs exact,
                                       build history

Row ids are contiguous (0..N-1) and assigned in append order, so a faiss id is a row id and a
row id is a position: no id map. Clips are keyed by (path, start, end), which is what lets an
append skip every clip that is already embedded. Paths are stored absolute (or as URIs), so the
served index does not depend on where the manifest was.

A video written anew at its path (another size or modification time than `files/` records) has
its indexed clips embedded again by the next append that lists it: their rows keep their ids and
metadata, and their new vectors go into `replaced/`, which `read_embeddings` (the faiss build)
applies over the parts' `embedding` column, which keeps the first vector.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipray.config import ConfigError

META = "index.json"
FORMAT = "clipray.index/1"  # index.json's "format": what tells our metadata from another index.json
FAISS = "index.faiss"
EMB_DIR = "embeddings"
RERANK_DIR = "rerank"
REPLACED_DIR = "replaced"
FILES_DIR = "files"
META_COLUMNS = ["row_id", "video_id", "start", "end", "path"]


def clip_key(path: str, start: Optional[float], end: Optional[float]) -> tuple:
    """Identity of a clip across runs (milliseconds, so float noise cannot split one clip)."""
    ms = lambda t: None if t is None or (isinstance(t, float) and math.isnan(t)) else round(float(t) * 1000)  # noqa: E731
    return (path, ms(start), ms(end))


def fingerprint(export_dir: str | Path) -> str:
    """sha256 of the export's weights: an index and the encoders that query it must agree."""
    h = hashlib.sha256()
    with open(Path(export_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_meta(out: str | Path) -> Optional[dict[str, Any]]:
    p = Path(out) / META
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except ValueError as e:
        why = str(e)
    else:
        if not isinstance(meta, dict):
            why = f"a JSON {type(meta).__name__}, not an object"
        elif meta.get("format") != FORMAT:
            # another tool's index.json (a common name) failed later, as a KeyError traceback
            # from `clipray serve` or `clipray index`
            why = f"its \"format\" is {meta.get('format')!r}, not {FORMAT!r}"
        else:
            return meta
    raise ConfigError(f"{p}: not an index's metadata ({why}): move it away and run `clipray index` "
                      "with the same out= and checkpoint= to write it again, or give another out=")


_STRERRORS = {os.strerror(n): n for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)}


def write_whole(path: str | Path, tmp: str | Path, write: Callable[[str], Any]) -> Path:
    """`write(tmp)`, then `tmp` renamed to `path`: a run killed or failed midway leaves no cut
    file that reads as whole. A failed write removes `tmp` (on a full disk, a cut copy of a big
    faiss index or part kept its space) and is an OSError naming `path`: pyarrow's and Python's
    OSError for a full disk, and faiss's RuntimeError, named none, and `clipray index` ended in
    its traceback."""
    try:
        write(str(tmp))
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno and e.filename is None:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        why = re.search(r"write error in .*\((.+?)\)\s*$", str(e)) if isinstance(e, RuntimeError) else None
        if why:  # faiss: "... write error in <tmp>: 49955 != 409600 (No space left on device)"
            raise OSError(_STRERRORS.get(why.group(1), errno.EIO), why.group(1), str(path)) from e
        raise
    return Path(tmp).replace(path)


def write_meta(out: str | Path, meta: dict[str, Any]) -> None:
    p = Path(out) / META
    text = json.dumps(meta, indent=1, sort_keys=True)
    write_whole(p, p.with_suffix(".tmp"), lambda tmp: Path(tmp).write_text(text))


def parts(out: str | Path, sub: str = EMB_DIR, suffix: str = ".parquet") -> list[Path]:
    # absolute: pyarrow takes a relative path whose first folder has a ':' (out=idx-12:30) for a
    # URI of an unknown scheme, and every part written or read there failed (ArrowInvalid)
    return sorted((Path(out).absolute() / sub).glob(f"part-*{suffix}"))


@contextlib.contextmanager
def reading_part(path: str | Path) -> Iterator[None]:
    """Around a read of an embeddings part: a file that is no Parquet (cut short by a copy, or
    another file named part-*) is one line naming it, not pyarrow's traceback."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        raise ConfigError(f"{path}: not a readable embeddings part ({str(e).splitlines()[0][:200]}): copy the "
                          "whole index folder again, or build the index again into a new out=") from None


def _read_part(path: Path, columns: Optional[list[str]]) -> pa.Table:
    with reading_part(path):
        return pq.read_table(path, columns=columns)


def read_table(out: str | Path, columns: Optional[list[str]] = None) -> pa.Table:
    """All embedding parts, ordered by row_id (empty table with no parts)."""
    files = parts(out)
    if not files:
        return pa.table({c: [] for c in (columns or META_COLUMNS)})
    t = pa.concat_tables(_read_part(f, columns) for f in files)
    ids = t.column("row_id").to_numpy()
    if not (ids[1:] > ids[:-1]).all():
        # Parts are written in row-id order, and then nothing is sorted: a sort gathers every
        # column into one array, and a string column of over 2 GiB (the paths of tens of
        # millions of clips) overflows a string array's 32-bit offsets, so an index that large
        # could be neither served nor appended to ("offset overflow while concatenating arrays").
        # Out of order (parts not written by clipray index), its strings are sorted as large ones.
        t = t.cast(pa.schema([pa.field(f.name, pa.large_string()) if pa.types.is_string(f.type) else f
                              for f in t.schema])).sort_by("row_id")
        ids = t.column("row_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):  # a faiss id is a position, a row id too
        shown = ids.tolist() if len(ids) <= 12 else ids[:12].tolist() + ["..."]
        raise ConfigError(f"{out}: the embedding parts' row ids are not 0..{len(ids) - 1} ({shown}): a part "
                          "was removed, or two runs appended at once; build the index again into a new out=")
    return t


def read_embeddings(out: str | Path) -> np.ndarray:
    """Every stored embedding [N, D] float32, by row id, streamed part by part into the one
    array a few thousand rows at a time. `read_table(...)`'s column joined into one peaked at three
    times the vectors (Parquet's reader of a whole part, the table sorted by row id, its chunks
    joined): 2.4 GB to rebuild an index of 400k vectors of D 512 (0.8 GB), now under 1 GB.
    The vectors of clips embedded again (`replaced/`) replace their rows' first ones."""
    n = read_table(out, ["row_id"]).num_rows  # (and its row ids checked: 0..N-1)
    x: Optional[np.ndarray] = None
    for f in parts(out) + parts(out, REPLACED_DIR):
        # buffered, not pre-buffered: a part's column is read a page at a time, not whole
        with reading_part(f), pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False) as pf:
            for batch in pf.iter_batches(batch_size=_EMBEDDING_ROWS, columns=["row_id", "embedding"]):
                col = batch.column("embedding")
                if len(col) == 0:
                    continue
                block = np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1)
                if x is None:
                    x = np.empty((n, block.shape[1]), np.float32)
                x[batch.column("row_id").to_numpy()] = block
    return x if x is not None else np.zeros((0, 0), np.float32)


_EMBEDDING_ROWS = 4096  # embeddings read from a part at a time


PART_FINGERPRINT = b"clipray.fingerprint"  # an embeddings part's: the export that embedded its clips
PART_SAMPLING = b"clipray.sampling"  # and the frame sampling they were embedded with (JSON)
PART_RERANK = b"clipray.rerank"  # and the re-ranker export that stored their features ("" none)


def part_fingerprints(out: str | Path) -> set[str]:
    """The fingerprints of the exports that embedded the index's parts (parts written before
    they recorded one say nothing)."""
    found = set()
    for f in parts(out):
        with reading_part(f):
            fp = (pq.read_schema(f).metadata or {}).get(PART_FINGERPRINT)
        if fp:
            found.add(fp.decode())
    return found


def part_reranks(out: str | Path) -> set[str]:
    """The fingerprints of the re-ranker exports that stored the features of the index's
    parts' clips, "" for a part stored without any (parts written before they recorded it say
    nothing)."""
    found = set()
    for f in parts(out):
        with reading_part(f):
            got = (pq.read_schema(f).metadata or {}).get(PART_RERANK)
        if got is not None:
            found.add(got.decode())
    return found


def part_sampling(out: str | Path) -> dict[str, Any]:
    """The frame sampling the newest part that records one was embedded with, or {}."""
    for f in reversed(parts(out)):
        with reading_part(f):
            got = (pq.read_schema(f).metadata or {}).get(PART_SAMPLING)
        if got:
            return json.loads(got)
    return {}


def write_part(out: str | Path, rows: dict[str, np.ndarray], sub: str = EMB_DIR, fingerprint: str = "",
               sampling: Optional[dict] = None, rerank: str = "") -> Path:
    """One new part holding this run's clips (row_id, metadata, embedding [n, D]); an embeddings
    part records the `fingerprint` of the export that embedded them, their `sampling`, and with
    a fingerprint the `rerank` export's that stored their re-ranker features ("" for none)."""
    if sub != EMB_DIR:
        def savez(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **rows)

        path = _next_part(out, sub, ".npz")
        return write_whole(path, f"{path}.tmp", savez)
    table = pa.table({
        "row_id": pa.array(rows["row_id"], pa.int64()),
        "video_id": pa.array(rows["video_id"], pa.string()),
        "start": pa.array(rows["start"], pa.float64()),
        "end": pa.array(rows["end"], pa.float64()),
        "path": pa.array(rows["path"], pa.string()),
        "embedding": vectors(rows["embedding"]),
    })
    if fingerprint or sampling:
        table = table.replace_schema_metadata({PART_FINGERPRINT: fingerprint.encode(),
                                               **({PART_RERANK: rerank.encode()} if fingerprint else {}),
                                               **({PART_SAMPLING: json.dumps(sampling).encode()} if sampling else {})})
    return write_rows(out, sub, table)


def vectors(emb: np.ndarray) -> pa.FixedSizeListArray:
    """Embeddings [n, D] as a part's `embedding` column (float32, D to a row)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def _next_part(out: str | Path, sub: str, suffix: str) -> Path:
    """The path of a new part in `out/sub` (its folder made), after the parts there."""
    d = Path(out).absolute() / sub  # (see parts)
    d.mkdir(parents=True, exist_ok=True)
    return d / f"part-{len(parts(out, sub, suffix)):05d}{suffix}"


def write_rows(out: str | Path, sub: str, table: pa.Table | dict[str, pa.Array]) -> Path:
    """One new Parquet part of `table` (or columns) in `out/sub` (`embeddings/`, `replaced/`,
    `files/`), written under another name and renamed when whole: a run killed mid-write leaves
    no truncated part that every later read fails on."""
    path = _next_part(out, sub, ".parquet")
    table = table if isinstance(table, pa.Table) else pa.table(table)
    return write_whole(path, f"{path}.tmp", lambda tmp: pq.write_table(table, tmp))


def file_signatures(paths: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(size, modification time in ns) of each of the files `paths` (absolute paths or URIs),
    from one listing of each folder holding any: object storage lists 1,000 files a request,
    where a HEAD per file is a request each (1.2M videos in folders of 1,000: about 1.2k
    listings, not 1.2M requests). A file not found, or in a folder that cannot be listed,
    has none."""
    from collections import defaultdict
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    from clipray.manifest import ManifestError, filesystem

    folders: dict[str, set] = defaultdict(set)
    for p in paths:
        folders[p.rsplit("/", 1)[0]].add(p)

    def listed(folder: str) -> dict[str, tuple[int, int]]:
        try:
            fs, root = filesystem(folder or "/")
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except (ManifestError, OSError, pa.ArrowException):
            return {}
        return {p: (i.size, i.mtime_ns or 0) for i in infos
                if i.type == pafs.FileType.File and (p := f"{folder}/{i.base_name}") in folders[folder]}

    with ThreadPoolExecutor(16) as pool:
        return {p: sign for got in pool.map(listed, list(folders)) for p, sign in got.items()}


def recorded_signatures(out: str | Path) -> dict[str, tuple[int, int]]:
    """Each indexed file's signature as its clips were last embedded (`files/`; none for a
    file indexed before they were recorded)."""
    found = {}
    for f in parts(out, FILES_DIR):
        with reading_part(f):
            t = pq.read_table(f)
        found.update(zip(t.column("path").to_pylist(), zip(t.column("size").to_pylist(),
                                                            t.column("mtime_ns").to_pylist())))
    return found


def write_signatures(out: str | Path, signs: dict[str, tuple[int, int]]) -> None:
    if signs:
        write_rows(out, FILES_DIR, {"path": pa.array(list(signs), pa.string()),
                                    "size": pa.array([s for s, _ in signs.values()], pa.int64()),
                                    "mtime_ns": pa.array([t for _, t in signs.values()], pa.int64())})


# ---- faiss ------------------------------------------------------------------------------------
PQ_MIN_VECTORS = 256 * 39  # PQ codebooks: 256 centroids per sub-quantiser, 39 points each


def too_few_for(kind: str, n: int) -> str:
    """Why an index of `kind` cannot be trained on `n` vectors ("" if it can)."""
    if kind == "ivf_pq" and n < PQ_MIN_VECTORS:
        return f"ivf_pq needs >= {PQ_MIN_VECTORS} vectors to train its codebooks, got {n}: use flat, hnsw or ivf_sq8"
    return ""


def check_knobs(**knobs: int) -> None:
    """Refuse index.* values faiss cannot take: it segfaults (hnsw_m=1), aborts (0) or hangs
    (< 0) building HNSW, fails every search (nprobe=0, refine < 0), or returns one clip per
    query whatever k (ef_search=0)."""
    least = {"hnsw_m": (2, ""), "nprobe": (1, ""), "ef_search": (1, ""), "nlist": (0, " (0 = about 4 sqrt(N))"),
             "pq_m": (0, " (0 = dim / 4)"), "refine": (0, " (0 = off)")}
    for k, v in knobs.items():
        if v < least[k][0]:
            raise ConfigError(f"index.{k}={v} must be >= {least[k][0]}{least[k][1]}")


def pq_sub_quantizers(dim: int, pq_m: int) -> int:
    """index.pq_m (0 = dim / 4), which must divide the embedding dim."""
    m = pq_m or dim // 4
    if dim % m:
        raise ConfigError(f"index.pq_m={m} must divide the embedding dim {dim}")
    return m


def _nlist(n: int, want: int) -> int:
    """IVF list count: asked for, else ~4 sqrt(N); never so many that k-means lacks points."""
    nlist = want or int(4 * math.sqrt(max(n, 1)))
    return max(1, min(nlist, n // 39 if n >= 39 else 1))


def build_faiss(x: np.ndarray, kind: str, nlist: int = 0, pq_m: int = 0, refine: int = 0,
                hnsw_m: int = 32, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A trained, filled inner-product index over `x` [N, D]; returns (index, build params)."""
    import faiss

    check_knobs(nlist=nlist, pq_m=pq_m, refine=refine, hnsw_m=hnsw_m)
    n, d = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = np.concatenate([np.flatnonzero(~np.isfinite(x[i : i + 65536]).all(1)) + i for i in range(0, n, 65536)]
                         or [np.zeros(0, np.int64)])
    if len(bad):  # faiss's k-means stops on them in C++; a flat index never returns them
        raise ConfigError(f"{len(bad)} of {n} vectors are not finite (NaN/inf), rows {bad[:10].tolist()}: "
                          "the model gave no usable vector for those clips")
    ip = faiss.METRIC_INNER_PRODUCT
    params: dict[str, Any] = {"kind": kind}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, ip)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        params["hnsw_m"] = hnsw_m
    elif kind in ("ivf_flat", "ivf_sq8", "ivf_pq"):
        lists = _nlist(n, nlist)
        if kind == "ivf_pq":
            m = pq_sub_quantizers(d, pq_m)
            why = too_few_for(kind, n)
            if why:
                raise ConfigError(why)
            spec = f"IVF{lists},PQ{m}" + (",RFlat" if refine else "")
            params.update(pq_m=m, refine=refine)
        else:
            spec = f"IVF{lists},{'Flat' if kind == 'ivf_flat' else 'SQ8'}"
        index = faiss.index_factory(d, spec, ip)
        params.update(nlist=lists, factory=spec)
        # k-means wants ~256 points per list; PQ's codebooks want PQ_MIN_VECTORS whatever nlist is
        sample = max(256 * lists, PQ_MIN_VECTORS if kind == "ivf_pq" else 0)
        rng = np.random.default_rng(seed)
        train = x if n <= sample else x[rng.choice(n, sample, replace=False)]
        index.train(train)
    else:
        raise ConfigError(f"unknown index kind {kind!r}")
    for i in range(0, n, 65536):
        index.add(x[i : i + 65536])
    return index, params


def set_search_params(index: Any, nprobe: int = 16, ef_search: int = 128, refine: int = 0) -> None:
    """Runtime knobs are not all serialised by faiss: apply them after every load."""
    import faiss

    check_knobs(nprobe=nprobe, ef_search=ef_search, refine=refine)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search
    if refine and hasattr(index, "k_factor"):
        index.k_factor = float(refine)


def recall_at_k(index: Any, exact: Any, queries: np.ndarray, k: int = 10,
                captions: Optional[list[str]] = None) -> dict[str, float]:
    """Share of the index's top-k that belongs in the exact top-k, and both per-query latencies
    (ms). An index of fewer than k clips is searched for all of them, still under the name
    recall@k. A returned clip counts when its exact score reaches the exact k-th score: clips
    tied there (identical vectors) are equally right, whichever of them exact search kept.
    A query vector that is not finite is an error naming its caption (`captions`, the queries'
    texts): faiss finds nothing for it, and it lowered recall as a miss, without a word."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(q).all(1))
    if len(bad):
        first = f"caption {captions[bad[0]]!r}" if captions is not None else f"query {bad[0]}"
        raise ConfigError(f"{len(bad)} of {len(q)} recall queries are not finite (NaN/inf), the first {first}: "
                          "the model gave no usable vector for them, and would answer such a query with a 500 "
                          "(index.recall_queries=0 builds the index without the recall check)")
    top = min(k, exact.ntotal)
    t0 = time.perf_counter()
    dist, _ = exact.search(q, top)
    t1 = time.perf_counter()
    _, got = index.search(q, top)
    t2 = time.perf_counter()
    vecs = exact.reconstruct_batch(np.where(got >= 0, got, 0).ravel()).reshape(*got.shape, -1)
    scores = np.einsum("qkd,qd->qk", vecs, q)
    kth = dist[:, -1:]
    ok = (got >= 0) & (scores >= kth - 1e-5 * np.maximum(1.0, np.abs(kth)))
    hits = sum(len(set(g[o].tolist())) for g, o in zip(got, ok))
    return {f"recall@{k}": hits / max(1, top * len(q)), "queries": len(q),
            "exact_ms_per_query_batched": 1000 * (t1 - t0) / max(1, len(q)),
            "index_ms_per_query_batched": 1000 * (t2 - t1) / max(1, len(q))}


def save_faiss(out: str | Path, index: Any) -> list:
    """Write index.faiss; returns its `faiss_signature`, for index.json to record."""
    import faiss

    write_whole(Path(out) / FAISS, Path(out) / (FAISS + ".tmp"), lambda tmp: faiss.write_index(index, tmp))
    return faiss_signature(out)


def faiss_signature(out: str | Path) -> list:
    """index.faiss's size and a hash of its ends (`file_signature`): index.json records the
    one it describes. Written before index.json, a rebuild stopped between the two (killed, a
    full disk) left a faiss index that the older index.json's count may still match (the
    same clips indexed as another kind), served with that index.json's kind and search
    parameters."""
    import pyarrow.fs as pafs

    from clipray.manifest import file_signature

    return file_signature(pafs.LocalFileSystem(), str((Path(out) / FAISS).absolute()))


def load_faiss(out: str | Path, meta: dict[str, Any]) -> Any:
    import faiss

    path = Path(out) / FAISS
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:  # faiss's C++ assertion text: keep its last clause, the reason
        why = re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", str(e).strip())
        raise ConfigError(f"{path}: not a readable faiss index ({why}): rebuild it with `clipray index` "
                          "and the same out=") from None
    # a file from an interrupted build or another index would serve ids the clip table lacks
    if (index.ntotal, index.d) != (meta.get("count", index.ntotal), meta.get("dim", index.d)):
        raise ConfigError(f"{path} holds {index.ntotal} vectors of dim {index.d} where {META} says "
                          f"{meta['count']} of dim {meta['dim']}: rebuild it with `clipray index` and the same out=")
    if meta.get("faiss_file") and meta["faiss_file"] != faiss_signature(out):
        raise ConfigError(f"{path} is not the faiss index {META} describes (a `clipray index` stopped between "
                          "writing the two): rebuild it with `clipray index` and the same out=")
    p = meta.get("search", {})
    set_search_params(index, p.get("nprobe", 16), p.get("ef_search", 128), p.get("refine", 0))
    return index


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype and Fortran order of the .npy stream `f`, which is left at its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, dtype, fortran


_RERANK_ROWS = 4096  # feature rows read from a part at a time


def read_rerank(out: str | Path, count: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Frame features [N, T, D] fp16 and masks [N, T] by row id, or None without a re-ranker.

    A part's features are read into place a few thousand rows at a time: loaded whole, a part
    (a whole index's, 12 GB for 1M clips of 12 frames at D 512) and the copy of its kept rows
    stood beside the array they went into, three times the memory the Reranker keeps.

    Every row of the index has features: a row no part holds (a part left out of a copy of the
    folder) is an error naming the rows. Its mask was all zero, and every search that drew it
    as a candidate failed in the cross-encoder (a clip with no valid frame), a 500."""
    import zipfile

    files = parts(out, RERANK_DIR, ".npz")
    if not files:
        return None
    shapes = []
    for f in files:
        with zipfile.ZipFile(f) as z, z.open("feats.npy") as fh:
            shapes.append(_npy_header(fh)[0])
    # an append with another video.max_frames stored another frame count: the shorter parts are
    # padded with masked frames, which the cross-encoder ignores
    t = max(s[1] for s in shapes)
    feats = np.zeros((count, t, shapes[0][2]), np.float16)
    mask = np.zeros((count, t), np.uint8)
    held = np.zeros(count, bool)
    for f, (_, n, d) in zip(files, shapes):  # in write order: a later part's rows replace an interrupted run's
        with np.load(f) as z:
            row_id, part_mask = z["row_id"], z["mask"]
        keep = row_id < count  # an interrupted append's rows past the index: never served
        rows = row_id[keep]
        held[rows] = True
        mask[rows] = 0  # all of a replaced row, also frames past this part's count
        mask[rows, :n] = part_mask[keep]
        with zipfile.ZipFile(f) as z, z.open("feats.npy") as fh:
            _, dtype, fortran = _npy_header(fh)
            if fortran:  # (np.savez of a C-ordered array never writes one)
                fh.close()
                with np.load(f) as whole:
                    feats[rows, :n] = whole["feats"][keep]
                continue
            for a in range(0, len(row_id), _RERANK_ROWS):
                m = min(_RERANK_ROWS, len(row_id) - a)
                block = np.frombuffer(fh.read(m * n * d * dtype.itemsize), dtype).reshape(m, n, d)
                sel = keep[a:a + m]
                feats[row_id[a:a + m][sel], :n] = block[sel]
    if not held.all():
        lack = np.flatnonzero(~held)
        shown = lack.tolist() if len(lack) <= 12 else lack[:12].tolist() + ["..."]
        raise ConfigError(f"{out}: its {RERANK_DIR}/ parts hold no re-ranker features for {len(lack)} of its {count} "
                          f"clips (row ids {shown}): a part was left out of a copy; copy the whole index folder again")
    return feats, mask


def clip_ms(times: pa.Array | pa.ChunkedArray) -> list:
    """`clip_key`'s milliseconds of each time of a column (None for a null or NaN), a column at
    a time (numpy's rint rounds half to even, as round does); a time past int64 in ms (or inf)
    goes through clip_key itself."""
    x = times.cast(pa.float64()).to_numpy(zero_copy_only=False) * 1000.0  # a null is NaN
    none = np.isnan(x)
    if not np.all(none | (np.abs(x) < 2.0**62)):
        return [clip_key("", t, None)[1] for t in times.to_pylist()]
    ms = np.rint(np.where(none, 0.0, x)).astype(np.int64).astype(object)
    ms[none] = None
    return ms.tolist()


def existing_ids(table: pa.Table) -> dict[tuple, str]:
    """The video id of every clip of the index's table, by its clip_key (its path, start and end)."""
    keys = zip(table.column("path").to_pylist(), clip_ms(table.column("start")), clip_ms(table.column("end")))
    return dict(zip(keys, table.column("video_id").to_pylist()))
