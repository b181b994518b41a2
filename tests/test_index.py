"""`clipray index`: the Ray Data embedding job, sliding windows, appends, approximate indexes,
the tightTransf re-ranker features, and the guards (cross-encoder refused, model mismatch).

The model is the session's tiny trained export (`test_serve.trained_export`: a plain-PyTorch
fit of `test_meanP` on the synthetic videos and events; see test_serve.py). Queries are encoded
with that export directly and searched in the faiss index the job wrote, so these tests need
no Serve app.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from clipray.config import ConfigError
from runs import embedding_matrix
from test_serve import trained_export

WINDOWS = ["index.window_s=2", "index.stride_s=1"]


def _cfg(export: str, manifest: str, out, *extra: str):
    from serve.config import load_app_config

    return load_app_config(None, [f"checkpoint={export}", f"manifest={manifest}", f"out={out}", *extra])


@pytest.fixture(scope="module")
def export(tmp_path_factory, synth_small) -> str:
    return trained_export(tmp_path_factory, synth_small)


@pytest.fixture(scope="module")
def windowed(ray_local, export, synth_small, tmp_path_factory) -> dict:
    """A 2 s / 1 s sliding-window index, built in two runs: the test split, then everything."""
    from serve import store
    from serve.index import build_index

    out = tmp_path_factory.mktemp("windowed")
    first = build_index(_cfg(export, synth_small["manifest"], out, "index.split=test", *WINDOWS), quiet=True)
    part0 = store.parts(out)[0].read_bytes()
    full = build_index(_cfg(export, synth_small["manifest"], out, *WINDOWS), quiet=True)
    return {"out": out, "first": first, "full": full, "part0": part0}


def test_windows_cover_the_video():
    from serve.index import windows

    assert windows(4.0, 2.0, 1.0) == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0)]
    assert windows(5.0, 2.0, 2.0) == [(0.0, 2.0), (2.0, 4.0), (3.0, 5.0)]
    assert windows(1.5, 2.0, 1.0) == [(0.0, 1.5)]


def test_an_index_folder_given_relative_with_a_colon_in_its_name_is_written_and_read(tmp_path, monkeypatch):
    """out=idx-12:30 (a time in the name, relative to the working directory): pyarrow read
    'idx-12' as a URI scheme, and writing the embeddings part (after every clip was embedded),
    reading it back and serving it failed on an ArrowInvalid traceback."""
    from serve import store

    monkeypatch.chdir(tmp_path)
    store.write_part("idx-12:30", {"row_id": np.arange(2), "video_id": np.array(["a", "b"], object),
                                   "start": np.array([None, 1.0], object), "end": np.array([None, 2.0], object),
                                   "path": np.array(["/v/a.mp4", "/v/b #1.mp4"], object),
                                   "embedding": np.eye(2, 3, dtype=np.float32)})
    assert store.read_table("idx-12:30", ["row_id", "video_id", "path"]).to_pylist() == [
        {"row_id": 0, "video_id": "a", "path": "/v/a.mp4"}, {"row_id": 1, "video_id": "b", "path": "/v/b #1.mp4"}]
    assert np.array_equal(store.read_embeddings("idx-12:30"), np.eye(2, 3, dtype=np.float32))


def test_pq_codebooks_train_on_enough_vectors_and_a_tiny_index_reports_recall_at_10(capfd):
    """ivf_pq with few lists trained its PQ codebooks on 256 x nlist vectors (1,024 here), below
    the 9,984 that 256 centroids need (faiss warned); and an index of 6 clips filed its recall
    as recall@6, which the summary line read as recall@10 = nan."""
    import faiss

    from serve import store

    x = np.random.default_rng(0).standard_normal((12_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store.build_faiss(x, "ivf_pq", nlist=4, pq_m=8)
    assert "please provide at least" not in capfd.readouterr().err
    exact = faiss.IndexFlatIP(32)
    exact.add(x[:6])
    index, _ = store.build_faiss(x[:6], "hnsw")
    rec = store.recall_at_k(index, exact, x[:3])
    assert rec["recall@10"] == 1.0 and rec["queries"] == 3


def test_serving_an_index_whose_export_is_gone_or_a_run_folder_fails_in_a_line(windowed, export, tmp_path):
    """Both used to fail later: a deleted export as tracebacks from every encoder replica once
    Ray was up, a run folder given as checkpoint= as a bare 'No such file'."""
    import shutil

    from serve.app import app_from_config
    from serve.config import load_app_config

    idx = tmp_path / "idx"
    shutil.copytree(windowed["out"], idx)
    meta = json.loads((idx / "index.json").read_text())
    meta = {k: v for k, v in meta.items() if k != "export_rel"}
    (idx / "index.json").write_text(json.dumps({**meta, "export": str(tmp_path / "deleted")}))
    with pytest.raises(ConfigError, match=rf"^the index {idx} was built with the export {tmp_path / 'deleted'}, "
                                          r"which is gone \(no model.safetensors in it\)"):
        app_from_config(load_app_config(None, [f"out={idx}"]))
    with pytest.raises(FileNotFoundError, match="not a clipray export, no config.json in it"):
        app_from_config(load_app_config(None, [f"out={idx}", f"checkpoint={Path(export).parent}"]))


def test_serving_an_index_whose_export_was_exported_again_is_refused(tmp_path):
    """The index records its export's path and a fingerprint of its weights. A model exported
    again at that path (a run folder deleted and trained anew) was served as it was: the text
    encoder's vectors searched the old model's index, and every answer was wrong without a word."""
    import shutil

    import torch

    from clipray.export import save_export
    from clipray.models import create_model
    from serve import store
    from serve.app import app_from_config
    from serve.config import load_app_config

    def export(name, head, seed):
        torch.manual_seed(seed)
        return str(save_export(create_model(f"test_{head}"), tmp_path / name))

    loose, tight = export("loose", "meanP", 0), export("tight", "tightTransf", 0)
    idx = tmp_path / "idx"
    idx.mkdir()
    store.write_meta(idx, {"format": "clipray.index/1", "export": loose, "fingerprint": store.fingerprint(loose),
                           "dim": 64, "count": 1, "kind": "flat", "video": {"fps": 2.0, "max_frames": 8},
                           "rerank": {"export": tight, "fingerprint": store.fingerprint(tight)}})
    app_from_config(load_app_config(None, [f"out={idx}"]))  # as built: composes
    for name, head, what, fix in (("loose", "meanP", "export", "give checkpoint= an export of the same weights"),
                                  ("tight", "tightTransf", "re-ranker export", "index again into a new out=")):
        keep = tmp_path / f"{name}-kept"
        shutil.copytree(tmp_path / name, keep)
        export(name, head, 1)  # the same path, other weights
        with pytest.raises(ConfigError, match=rf"^the index {idx} was built with the {what} {tmp_path / name}, "
                                              rf"which now holds other weights \(exported again since\): its "
                                              rf"vectors would not match; {fix}"):
            app_from_config(load_app_config(None, [f"out={idx}"]))
        shutil.rmtree(tmp_path / name)
        keep.rename(tmp_path / name)
    app_from_config(load_app_config(None, [f"out={idx}", f"checkpoint={loose}"]))
    # the index's weights beside another export's config.json (a copy stopped between the two
    # files): refused before Serve starts, not in every replica as it loads
    other = export("other", "meanP", 1)
    shutil.copy(Path(other) / "config.json", Path(loose) / "config.json")
    with pytest.raises(ConfigError, match=rf"^{Path(loose) / 'model.safetensors'} and its config.json are of two "
                                          "different exports"):
        app_from_config(load_app_config(None, [f"out={idx}"]))


def test_an_index_moved_with_its_run_folder_or_alone_with_its_model_copy_still_serves(tmp_path):
    """index.json recorded its exports by absolute path only: the demo's index (runs/<run>/index,
    exported at runs/<run>/export) moved with its run folder, and an index built from an export
    at a URI (its own out/model-<fingerprint> copy) moved alone, were refused as built with an
    export 'which is gone', though both still held the very weights (one fixed only by indexing
    again). The export is found from the index folder first, checked by its fingerprint."""
    import shutil

    import torch

    from clipray.export import read_export_config, save_export
    from clipray.models import create_model
    from serve import store
    from serve.app import _export_for, _index_export, app_from_config
    from serve.config import load_app_config
    from serve.index import _rebuild

    def export(path, head, seed):
        torch.manual_seed(seed)
        return str(save_export(create_model(f"test_{head}"), path))

    run = tmp_path / "runs" / "demo"
    loose, tight = export(run / "export", "meanP", 0), export(run / "tight", "tightTransf", 0)
    idx = run / "index"
    conf = read_export_config(loose)
    dim = conf["open_clip_cfg"]["embed_dim"]
    store.write_part(idx, {"row_id": np.arange(2), "video_id": np.array(["a", "b"], object),
                           "start": np.array([None, None], object), "end": np.array([None, None], object),
                           "path": np.array(["/v/a.mp4", "/v/b.mp4"], object),
                           "embedding": np.eye(2, dim, dtype=np.float32)})
    cfg = load_app_config(None, [f"checkpoint={loose}", "manifest=unused", f"out={idx}"])
    store.write_meta(idx, _rebuild(idx, cfg, loose, store.fingerprint(loose), tight, conf, [], None))
    shutil.move(tmp_path / "runs", tmp_path / "moved")  # the whole run folder, index and exports
    moved = tmp_path / "moved" / "demo"
    cfg = load_app_config(None, [f"out={moved / 'index'}"])
    meta = store.read_meta(moved / "index")
    assert _export_for(cfg, meta) == str(moved / "export")
    assert _index_export(cfg, meta["rerank"], "re-ranker export", "") == str(moved / "tight")
    app_from_config(cfg)  # composes, with the re-ranker

    # an index holding its own copy (as `checkpoint=s3://...` leaves it; recorded before
    # export_rel too), moved alone while its export stayed where it was
    fp = store.fingerprint(loose := str(moved / "export"))
    alone = tmp_path / "alone"
    shutil.copytree(moved / "index", alone / "index")
    shutil.copytree(loose, alone / "index" / f"model-{fp}")
    meta = {k: v for k, v in meta.items() if k not in ("export_rel", "rerank")}
    store.write_meta(alone / "index", {**meta, "export": str(tmp_path / "built-here" / f"model-{fp}")})
    shutil.move(alone / "index", tmp_path / "served")
    cfg = load_app_config(None, [f"out={tmp_path / 'served'}"])
    assert _export_for(cfg, store.read_meta(tmp_path / "served")) == str(tmp_path / "served" / f"model-{fp}")
    app_from_config(cfg)


def test_an_index_copied_without_its_parts_fails_to_start_saying_so(tmp_path):
    """`cp index/* dest/` copies index.json and index.faiss and leaves out the embeddings/ and
    rerank/ folders: the searcher started with no clip for the ids faiss returns, and every
    search was a 500 (IndexError); the re-ranker failed to start on a TypeError. A part left
    out (fewer clips than index.faiss holds) was the same 500 for its ids."""
    import shutil

    import torch

    from clipray.export import read_export_config, save_export
    from clipray.models import create_model
    from serve import store
    from serve.config import load_app_config
    from serve.deployments import Reranker, Searcher
    from serve.index import _rebuild

    torch.manual_seed(0)
    loose = str(save_export(create_model("test_meanP"), tmp_path / "loose"))
    tight = str(save_export(create_model("test_tightTransf"), tmp_path / "tight"))
    idx = tmp_path / "idx"
    dim = read_export_config(loose)["open_clip_cfg"]["embed_dim"]
    for part in (range(0, 2), range(2, 3)):
        ids = np.arange(part.start, part.stop)
        store.write_part(idx, {"row_id": ids, "feats": np.zeros((len(ids), 2, dim), np.float16),
                               "mask": np.ones((len(ids), 2), np.uint8)}, sub=store.RERANK_DIR)
        store.write_part(idx, {"row_id": ids, "video_id": np.array([f"v{i}" for i in ids], object),
                               "start": np.array([None] * len(ids), object), "end": np.array([None] * len(ids), object),
                               "path": np.array([f"/v/{i}.mp4" for i in ids], object),
                               "embedding": np.eye(3, dim, dtype=np.float32)[ids]})
    cfg = load_app_config(None, [f"checkpoint={loose}", "manifest=unused", f"out={idx}"])
    store.write_meta(idx, _rebuild(idx, cfg, loose, store.fingerprint(loose), tight, read_export_config(loose), [], None))
    batch = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}
    assert Searcher.func_or_class(str(idx), batch).info()["clips"] == 3  # the whole index starts
    Reranker.func_or_class(tight, str(idx), 32, batch)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in idx.iterdir():
        if f.is_file():  # cp idx/* copy/
            shutil.copy(f, copy)
    with pytest.raises(ConfigError, match=rf"^{copy}: its embeddings/ parts hold 0 clips where index.faiss holds 3: "
                                          "copy the whole index folder again"):
        Searcher.func_or_class(str(copy), batch)
    with pytest.raises(ConfigError, match=rf"^{copy}: its index.json names a re-ranker and it has no rerank/ parts"):
        Reranker.func_or_class(tight, str(copy), 32, batch)
    shutil.copytree(idx / "embeddings", copy / "embeddings")
    (copy / "embeddings" / "part-00001.parquet").unlink()  # one part left out
    with pytest.raises(ConfigError, match=r"parts hold 2 clips where index.faiss holds 3"):
        Searcher.func_or_class(str(copy), batch)
    # an append under way (its part written, its faiss index not yet) or stopped there: a replica
    # started meanwhile serves the index as it was, where it was refused ("copy ... again")
    store.write_part(idx, {"row_id": np.arange(3, 5), "video_id": np.array(["v3", "v4"], object),
                           "start": np.array([None] * 2, object), "end": np.array([None] * 2, object),
                           "path": np.array(["/v/3.mp4", "/v/4.mp4"], object), "embedding": np.eye(2, dim, dtype=np.float32)})
    s = Searcher.func_or_class(str(idx), batch)
    assert s.info()["clips"] == 3 and s.clip_path(2) == "/v/2.mp4" and s.clip_path(3) is None
    assert [h["clip_id"] for h in s.search_many([(np.eye(1, dim, 1, dtype=np.float32)[0], 5)])[0]][:1] == [1]
    before = Reranker.func_or_class(tight, str(idx), 32, batch)
    # the append finishes; a Searcher replica started since (autoscaled, restarted) returns its
    # clips to a Reranker replica that read the features before: it reads them again, where the
    # batch failed with an IndexError (a 500 for every request in it, those of old clips too)
    feats = np.random.default_rng(0).standard_normal((2, 2, dim)).astype(np.float16)
    store.write_part(idx, {"row_id": np.arange(3, 5), "feats": feats, "mask": np.ones((2, 2), np.uint8)},
                     sub=store.RERANK_DIR)
    meta = store.read_meta(idx)
    store.write_meta(idx, _rebuild(idx, cfg, loose, meta["fingerprint"], tight, read_export_config(loose), [], meta))
    assert Searcher.func_or_class(str(idx), batch).info()["clips"] == 5
    reqs = [("a red square", [0, 1]), ("a blue circle", [4, 3, 2])]
    want = Reranker.func_or_class(tight, str(idx), 32, batch).rerank_many(reqs)
    got = before.rerank_many(reqs)
    assert [len(g) for g in got] == [2, 3] and np.allclose(got[0], want[0]) and np.allclose(got[1], want[1])
    assert got[1][0] != got[1][2]  # the appended clip's own features, not a row of zeros
    # a rebuild as another kind stopped between index.faiss and index.json (killed, a full
    # disk): the count still agrees, and the hnsw index was served as index.json's exact one
    hnsw = load_app_config(None, [f"checkpoint={loose}", "manifest=unused", f"out={idx}", "index.kind=hnsw"])
    _rebuild(idx, hnsw, loose, meta["fingerprint"], tight, read_export_config(loose), [], store.read_meta(idx))
    with pytest.raises(ConfigError, match=rf"^{idx}/index.faiss is not the faiss index index.json describes "
                                          r"\(a `clipray index` stopped between writing the two\): rebuild it"):
        Searcher.func_or_class(str(idx), batch)


def test_an_export_written_again_while_an_index_is_built_fails_the_run_and_leaves_the_index(tmp_path, monkeypatch):
    """`clipray index checkpoint=runs/x/export` while a run of that name writes its export
    again: every embedding actor loads the export from its path, so the clips were embedded
    with other weights than the fingerprint the index recorded (some actors' old, some new)
    and the run said 'N added'. The export is checked again once the clips are embedded."""
    import torch

    import clipray.runtime
    import serve.index as index_mod
    from clipray.export import read_export_config, save_export
    from clipray.manifest import write_manifest
    from clipray.models import create_model
    from serve import store

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    torch.manual_seed(0)
    export = str(save_export(create_model("test_meanP"), tmp_path / "export"))
    manifest, idx = tmp_path / "m.parquet", tmp_path / "idx"
    write_manifest([{"video_id": v, "path": f"/v/{v}.mp4", "caption": f"clip {v}", "split": "test"} for v in "ab"],
                   manifest)
    dim = read_export_config(export)["open_clip_cfg"]["embed_dim"]
    store.write_part(idx, {"row_id": np.arange(2), "video_id": np.array(["a", "b"], object),
                           "start": np.array([None, None], object), "end": np.array([None, None], object),
                           "path": np.array(["/v/a.mp4", "/v/b.mp4"], object),
                           "embedding": np.eye(2, dim, dtype=np.float32)})
    cfg = _cfg(export, manifest, idx)
    conf = read_export_config(export)
    store.write_meta(idx, index_mod._rebuild(idx, cfg, export, store.fingerprint(export), "", conf, [], None))
    before = {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()}
    real = index_mod.plan_clips

    def training_meanwhile(*a, **k):  # the run of that name exports its next epoch
        torch.manual_seed(1)
        save_export(create_model("test_meanP"), export)
        return real(*a, **k)

    monkeypatch.setattr(index_mod, "plan_clips", training_meanwhile)
    with pytest.raises(ConfigError, match=rf"^checkpoint={export}: written again while this run embedded its "
                                          rf"clips \(other weights than it began with\); {idx} is as it was: "
                                          "run clipray index again$"):
        index_mod.build_index(cfg, quiet=True)
    assert {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file() and p.name != index_mod.LOCK} == before


def test_a_first_build_stopped_before_its_index_json_is_not_taken_for_another_models(tmp_path, monkeypatch):
    """A first `clipray index` stopped after writing its part and before index.json (killed,
    out of memory in the faiss rebuild) left clips that no index.json said a model of: a run
    with another export into the same out= took them as embedded already, added its own and
    served both models' vectors as its own. The part records the export that embedded it."""
    import torch

    import clipray.runtime
    from clipray.export import read_export_config, save_export
    from clipray.manifest import write_manifest
    from clipray.models import create_model
    from serve import store
    from serve.index import PLAN, _write_new, build_index

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    exports = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        exports.append(str(save_export(create_model("test_meanP"), tmp_path / f"export{seed}")))
    manifest, idx = tmp_path / "m.parquet", tmp_path / "idx"
    write_manifest([{"video_id": v, "path": f"/v/{v}.mp4", "caption": f"clip {v}", "split": "test"} for v in "ab"],
                   manifest)
    dim = read_export_config(exports[0])["open_clip_cfg"]["embed_dim"]
    fp = store.fingerprint(exports[0])
    # the first build's clips, embedded with exports[0] and written; it stopped there
    _write_new(idx, [{"video_id": np.array(["a", "b"], object), "path": np.array(["/v/a.mp4", "/v/b.mp4"], object),
                      "start": np.full(2, np.nan), "end": np.full(2, np.nan),
                      "embedding": np.eye(2, dim, dtype=np.float32), PLAN: np.arange(2)}], 0, "", fp)
    with pytest.raises(ConfigError, match=rf"^{idx} holds clips embedded with another model \(fingerprint {fp}\) "
                                          r"by a `clipray index` that stopped before writing index.json"):
        build_index(_cfg(exports[1], manifest, idx), quiet=True)
    assert not (idx / store.META).exists()
    meta = build_index(_cfg(exports[0], manifest, idx), quiet=True)  # its own export finishes it
    assert meta["fingerprint"] == fp and meta["count"] == 2


def test_a_first_build_stopped_before_its_index_json_keeps_its_re_ranker_features_all_or_none(tmp_path,
                                                                                             monkeypatch):
    """A first build without a re-ranker stopped after its part and before index.json: run
    again with index.rerank_checkpoint, nothing compared the two, and the index.json written
    named a re-ranker for clips that had no features (the Reranker refused to start, saying to
    copy the index folder again; with this run's clips' features beside them, every search that
    drew one of the first run's clips failed). Each part records its re-ranker, or none."""
    import torch

    import clipray.runtime
    from clipray.export import read_export_config, save_export
    from clipray.manifest import write_manifest
    from clipray.models import create_model
    from serve import store
    from serve.index import PLAN, _write_new, build_index

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    torch.manual_seed(0)
    export = str(save_export(create_model("test_meanP"), tmp_path / "export"))
    tight = str(save_export(create_model("test_tightTransf"), tmp_path / "tight"))
    manifest, idx = tmp_path / "m.parquet", tmp_path / "idx"
    write_manifest([{"video_id": v, "path": f"/v/{v}.mp4", "caption": f"clip {v}", "split": "test"} for v in "ab"],
                   manifest)
    dim = read_export_config(export)["open_clip_cfg"]["embed_dim"]
    clips = {"video_id": np.array(["a", "b"], object), "path": np.array(["/v/a.mp4", "/v/b.mp4"], object),
             "start": np.full(2, np.nan), "end": np.full(2, np.nan), "embedding": np.eye(2, dim, dtype=np.float32),
             PLAN: np.arange(2)}
    _write_new(idx, [dict(clips)], 0, "", store.fingerprint(export))  # without a re-ranker; it stopped there
    with pytest.raises(ConfigError, match=rf"^{idx} holds clips stored without re-ranker features by a `clipray "
                                          rf"index` that stopped before writing index.json, and this run's is {store.fingerprint(tight)}"):
        build_index(_cfg(export, manifest, idx, f"index.rerank_checkpoint={tight}"), quiet=True)
    assert not (idx / store.META).exists()
    meta = build_index(_cfg(export, manifest, idx), quiet=True)  # as it was run, it is finished
    assert meta["count"] == 2 and meta["rerank"] is None
    # one stopped with a re-ranker: its clips' features are of that one, which finishes it
    idx = tmp_path / "rr"
    t = read_export_config(tight)
    _write_new(idx, [dict(clips, rerank_feats=np.ones((2, 8, t["open_clip_cfg"]["embed_dim"]), np.float16),
                          rerank_mask=np.ones((2, 8), np.uint8))], 0, tight, store.fingerprint(export), None,
               store.fingerprint(tight))
    with pytest.raises(ConfigError, match=rf"^{idx} holds clips stored with the features of the re-ranker export of "
                                          rf"fingerprint {store.fingerprint(tight)} by .*, and this run has no "
                                          r"index.rerank_checkpoint"):
        build_index(_cfg(export, manifest, idx), quiet=True)
    meta = build_index(_cfg(export, manifest, idx, f"index.rerank_checkpoint={tight}"), quiet=True)
    assert meta["rerank"]["fingerprint"] == store.fingerprint(tight) and store.read_rerank(idx, 2)[1].all()


def test_a_first_build_stopped_before_its_index_json_keeps_its_sampling(ray_local, export, synth_small, tmp_path,
                                                                         monkeypatch):
    """A first build stopped after its part and before index.json (out of memory in the faiss
    rebuild): the next run's video.* was compared with nothing, so clips embedded at fps 2 and
    8 frames were recorded as sampled the next run's way (the app then sampled uploads so),
    and an append with the clips' own sampling was refused. Each part records its sampling."""
    import serve.index as index
    from serve import store

    out = tmp_path / "idx"
    monkeypatch.setattr(index, "_rebuild", lambda *a, **k: (_ for _ in ()).throw(MemoryError("faiss rebuild")))
    with pytest.raises(MemoryError):
        index.build_index(_cfg(export, synth_small["manifest"], out, "index.split=test"), quiet=True)
    monkeypatch.undo()
    assert store.parts(out) and not (out / store.META).exists()
    with pytest.raises(ConfigError, match=rf"^{out} holds clips sampled with video.fps=2.0 video.max_frames=8 "
                                          r"video.slice=uniform; this append asks video.fps=4.0 video.max_frames=4 "
                                          r"video.slice=head"):
        index.build_index(_cfg(export, synth_small["manifest"], out, "index.split=test", "video.fps=4",
                               "video.max_frames=4", "video.slice=head"), quiet=True)
    meta = index.build_index(_cfg(export, synth_small["manifest"], out, "index.split=test"), quiet=True)
    assert {k: meta["video"][k] for k in ("fps", "max_frames", "slice")} == {"fps": 2.0, "max_frames": 8,
                                                                           "slice": "uniform"}


def test_a_replica_started_after_its_export_was_written_again_refuses_it(tmp_path):
    """The app checks its exports against the index when it starts; its replicas load them
    later too (an autoscaled or a restarted one). An export written again at that path meanwhile
    (a run trained anew under its name, a clip editing round) was loaded without a word, and the
    queries that replica encoded were vectors of another model than the index's."""
    import torch

    from clipray.export import save_export
    from clipray.models import create_model
    from serve import store
    from serve.deployments import Reranker, TextEncoder, VideoEncoder

    batch = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}
    video = {"fps": 1.0, "max_frames": 2}
    torch.manual_seed(0)
    loose = str(save_export(create_model("test_meanP"), tmp_path / "run" / "export"))
    tight = str(save_export(create_model("test_tightTransf"), tmp_path / "tight"))
    fp, tight_fp = store.fingerprint(loose), store.fingerprint(tight)
    store.write_part(tmp_path / "idx", {"row_id": np.arange(1), "feats": np.zeros((1, 2, 64), np.float16),
                                        "mask": np.ones((1, 2), np.uint8)}, sub=store.RERANK_DIR)
    store.write_meta(tmp_path / "idx", {"format": store.FORMAT, "count": 1})
    TextEncoder.func_or_class(loose, 32, batch, 0.0, fp)  # the weights the index was built with
    VideoEncoder.func_or_class(loose, video, batch, 0.0, fp)
    Reranker.func_or_class(tight, str(tmp_path / "idx"), 32, batch, 0.0, tight_fp)
    save_export(create_model("test_meanP"), loose)  # trained anew under the same run name
    save_export(create_model("test_tightTransf"), tight)
    said = r"now holds other weights than the index was built with \(exported again since this app started\)"
    with pytest.raises(ConfigError, match=rf"^{loose} {said}"):
        TextEncoder.func_or_class(loose, 32, batch, 0.0, fp)
    with pytest.raises(ConfigError, match=rf"^{loose} {said}"):
        VideoEncoder.func_or_class(loose, video, batch, 0.0, fp)
    with pytest.raises(ConfigError, match=rf"^{tight} {said}"):
        Reranker.func_or_class(tight, str(tmp_path / "idx"), 32, batch, 0.0, tight_fp)


def test_serving_with_the_export_at_a_uri_keeps_a_copy_in_an_index_built_from_a_local_one(s3_server, tmp_path):
    """An index built on one machine from a local export, copied to a server that reaches the
    run (and its export) only in object storage: `checkpoint=s3://.../export` was fetched,
    checked and thrown away, and serving then looked for the local export the index recorded
    ('which is gone: index again with checkpoint=...', an index job needing manifest= again).
    The checked copy is now kept in the index, as `clipray index` keeps one."""
    if s3_server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    import shutil

    import torch

    from clipray.export import save_export
    from clipray.models import create_model
    from serve import store
    from serve.app import _export_for, app_from_config
    from serve.config import load_app_config

    torch.manual_seed(0)
    export = str(save_export(create_model("test_meanP"), tmp_path / "run" / "export"))
    fp, idx = store.fingerprint(export), tmp_path / "idx"
    idx.mkdir()
    meta = {"format": "clipray.index/1", "export": export, "fingerprint": fp, "dim": 64, "count": 1,
            "kind": "flat", "video": {"fps": 2.0, "max_frames": 8}}
    store.write_meta(idx, meta)
    s3 = s3_server.ensure_bucket()
    s3.fs().put(export, f"{s3.bucket}/runs/served/export", recursive=True)
    shutil.rmtree(tmp_path / "run")  # the export is in the bucket only
    cfg = load_app_config(None, [f"out={idx}", f"checkpoint={s3.url('runs/served/export')}"])
    assert _export_for(cfg, meta) == str(idx / f"model-{fp}") and store.fingerprint(idx / f"model-{fp}") == fp
    app_from_config(cfg)  # again, with the copy already there
    assert sorted(p.name for p in idx.iterdir()) == ["index.json", f"model-{fp}"]  # no .fetch-* left
    app_from_config(load_app_config(None, [f"out={idx}"]))  # and without checkpoint= from now on


def test_append_embeds_only_new_clips(windowed, export, synth_small):
    from clipray.manifest import read_manifest
    from serve import store
    from serve.index import build_index

    out = windowed["out"]
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    want = sum(3 if r["duration"] == 4.0 else 1 for r in rows)  # 2-event videos: 3 windows
    n_test = sum(3 if r["duration"] == 4.0 else 1 for r in rows if r["split"] == "test")
    assert windowed["first"]["count"] == n_test > 0
    assert windowed["full"]["count"] == want
    assert windowed["full"]["history"][-1]["added"] == want - n_test  # nothing embedded twice
    assert store.parts(out)[0].read_bytes() == windowed["part0"]  # first run's part untouched
    t = store.read_table(out)
    assert t.column("row_id").to_pylist() == list(range(want))
    keys = store.existing_ids(t)
    assert len(keys) == want  # (path, start, end) unique
    again = build_index(_cfg(export, synth_small["manifest"], out, *WINDOWS), quiet=True)
    assert again["history"][-1]["added"] == 0 and again["count"] == want
    assert len(store.parts(out)) == 2


def test_an_append_embeds_again_the_clips_of_a_video_written_anew_at_its_path(ray_local, export, synth_small,
                                                                            tmp_path, capsys):
    """A video written anew at its path (new content) kept its old vector after an append: its
    clip was keyed by path and times, indexed already, so the append skipped it, and a search
    with the new video ranked its own clip low. Each file's size and modification time are
    recorded as its clips are embedded; an append listing a file whose signature changed embeds
    its clips again, under their ids, as a first build would. An index built before signatures
    were recorded takes its files as unchanged, says so once and records them."""
    import shutil

    from clipray.manifest import read_manifest, resolve_path, write_manifest
    from serve import store
    from serve.index import build_index

    root = Path(synth_small["manifest"]).parent
    rows = [dict(r, path=resolve_path(r["path"], str(root))) for r in read_manifest(synth_small["manifest"]).to_pylist()
            if r["split"] == "test"][:3]
    (tmp_path / "v").mkdir()
    for r in rows:
        r["path"] = str(shutil.copyfile(r["path"], tmp_path / "v" / Path(r["path"]).name))
    a, b, c = rows

    def index(rows, out, name):
        write_manifest([{k: v for k, v in r.items() if k != "row_id"} for r in rows], tmp_path / name)
        return build_index(_cfg(export, str(tmp_path / name), tmp_path / out, "index.split=test"), quiet=True)

    index([a, b], "idx", "m1.parquet")
    before = store.read_embeddings(tmp_path / "idx")
    shutil.copyfile(c["path"], a["path"])  # video a written anew in place, with c's content
    capsys.readouterr()
    meta = index([a, b], "idx", "m2.parquet")
    scratch = index([a], "scratch", "m3.parquet")  # a's new content, embedded by a first build
    x = store.read_embeddings(tmp_path / "idx")
    want = store.read_embeddings(tmp_path / "scratch")[0]
    assert not np.allclose(before[0], want, atol=1e-4)
    assert np.allclose(x[0], want, atol=1e-5) and np.array_equal(x[1], before[1])  # b untouched
    assert meta["count"] == 2 and meta["history"][-1]["added"] == 0 and meta["history"][-1]["replaced"] == 1
    assert store.read_table(tmp_path / "idx", store.META_COLUMNS).column("video_id").to_pylist() == \
        [a["video_id"], b["video_id"]]  # a's clip keeps its id
    assert "0 new, 1 embedded again (their files were written anew since)" in capsys.readouterr().out
    import faiss

    searched = faiss.read_index(str(tmp_path / "idx" / store.FAISS))
    assert np.allclose(searched.reconstruct(0), want, atol=1e-5) and scratch["count"] == 1
    again = index([a, b], "idx", "m2.parquet")  # its new signature recorded: nothing to embed
    assert again["history"][-1]["replaced"] == again["history"][-1]["added"] == 0
    shutil.rmtree(tmp_path / "idx" / store.FILES_DIR)  # as an index built before signatures were recorded
    capsys.readouterr()
    assert index([a, b], "idx", "m2.parquet")["history"][-1]["replaced"] == 0
    assert capsys.readouterr().err.count("2 files of the manifest hold clips indexed before") == 1
    assert set(store.recorded_signatures(tmp_path / "idx")) == {a["path"], b["path"]}


def test_sliding_window_search_finds_the_event_window(windowed, export, synth_small):
    """An event's caption finds its video, and that video's best window is the event's."""
    import faiss
    import open_clip
    import torch

    from clipray.export import load_export
    from clipray.manifest import read_manifest
    from serve import store

    out = windowed["out"]
    meta = store.read_meta(out)
    index = store.load_faiss(out, meta)
    t = store.read_table(out, store.META_COLUMNS).to_pylist()
    model = load_export(export)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=32)
    events = [e for e in read_manifest(synth_small["events_manifest"]).to_pylist() if e["duration"] == 4.0]
    assert len(events) >= 6
    good = 0
    for e in events:
        with torch.no_grad():
            q = model.encode_text(tok([e["caption"]])).numpy()
        _, ids = index.search(q, 8)
        mine = [t[i] for i in ids[0] if t[i]["video_id"] == e["video_id"]]
        if mine:
            s, en = mine[0]["start"], mine[0]["end"]
            iou = max(0.0, min(en, e["end"]) - max(s, e["start"])) / (max(en, e["end"]) - min(s, e["start"]))
            good += iou >= 0.5
    assert isinstance(index, faiss.IndexFlatIP)
    assert good >= 0.8 * len(events), f"{good}/{len(events)} events found in their own window"


def test_approximate_index_reports_recall_and_cli(windowed, export, synth_small, tmp_path):
    import shutil

    from clipray.cli import main
    from serve import store

    out = tmp_path / "hnsw"
    shutil.copytree(windowed["out"], out)
    assert main(["index", str(Path(__file__).parents[1] / "serve" / "configs" / "demo.yaml"), f"checkpoint={export}", f"out={out}",
                 f"manifest={synth_small['manifest']}", "index.kind=hnsw", *WINDOWS]) == 0
    meta = store.read_meta(out)
    assert meta["kind"] == "hnsw" and meta["history"][-1]["added"] == 0
    assert meta["recall"]["recall@10"] >= 0.95 and meta["recall"]["queries"] > 0
    assert type(store.load_faiss(out, meta)).__name__ == "IndexHNSWFlat"


def test_videos_fixed_at_their_paths_after_a_first_build_that_skipped_every_clip_are_planned(tmp_path):
    """A first build whose every clip was skipped (unreadable videos) wrote no part but recorded
    each file's size and time. With the videos written anew (fixed) at their paths, the next
    run looked for the indexed clips of the changed files in a clip table of no parts, whose
    columns have no type: pyarrow's ArrowTypeError traceback ("null vs string"), before
    anything was embedded. There are none to embed again; the files' clips are new ones."""
    from serve import store
    from serve.index import changed_clips

    out, videos = tmp_path / "idx", [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for v in videos:
        v.write_bytes(b"not a video")
    files = {str(v) for v in videos}
    store.write_signatures(out, store.file_signatures(files))  # as the first build recorded them
    videos[0].write_bytes(b"a video now")  # another size
    existing = store.read_table(out, store.META_COLUMNS)
    assert len(existing) == 0
    again, signs = changed_clips(out, files, existing)
    assert again == [] and list(signs) == [str(videos[0])]


def test_cross_encoder_is_a_reranker_not_an_index(ray_local, windowed, export, synth_small, tmp_path,
                                                 monkeypatch):
    import gc
    import weakref

    import open_clip
    import torch

    import serve.index as index
    from clipray.export import load_export, save_export
    from clipray.models import create_model
    from serve import store
    from serve.deployments import score_candidates
    from serve.index import build_index

    tight = save_export(create_model("test_tightTransf"), tmp_path / "tight")
    with pytest.raises(ConfigError, match="cross-encoder"):
        build_index(_cfg(str(tight), synth_small["manifest"], tmp_path / "no"), quiet=True)
    # The embedded batches (vectors, re-ranker features) are written, then faiss is built over
    # every vector of the index read back: the batches were held to the end of the build, up to
    # as much memory again as the rebuild's own (with a re-ranker, 12 GB of frame features
    # for 1M clips). None may be alive when faiss builds.
    batches, alive = [], []
    write_new, build_faiss = index._write_new, store.build_faiss

    def recording_write_new(out, new, *args):
        batches.extend(weakref.ref(b[k]) for b in new for k in ("embedding", "rerank_feats"))
        return write_new(out, new, *args)

    def checking_build_faiss(*args, **kwargs):
        gc.collect()
        alive.append(sum(r() is not None for r in batches))
        return build_faiss(*args, **kwargs)

    monkeypatch.setattr(index, "_write_new", recording_write_new)
    monkeypatch.setattr(store, "build_faiss", checking_build_faiss)
    out = tmp_path / "rr"
    meta = build_index(_cfg(export, synth_small["manifest"], out, "index.split=test",
                            f"index.rerank_checkpoint={tight}"), quiet=True)
    assert len(batches) >= 2 and alive == [0], f"{alive} of {len(batches)} embedded batch arrays held"
    monkeypatch.undo()
    feats, mask = store.read_rerank(out, meta["count"])
    assert feats.shape == (meta["count"], 8, 64) and mask.sum(1).min() > 0
    # what the Reranker deployment computes: one cross-encoder score per candidate
    model = load_export(tight)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=32)
    scores = score_candidates(model, tok, torch.from_numpy(feats), torch.from_numpy(mask).bool(),
                              [("a red square moves left", [0, 1]), ("a blue circle moves up", [1])])
    assert [len(s) for s in scores] == [2, 1] and np.isfinite(scores[0]).all()
    # an append must keep every row with features or none: a row without them made every
    # search that drew it as a candidate fail with a 500
    count = meta["count"]
    with pytest.raises(ConfigError, match=f"holds re-ranker features for its {count} clips: append with the same"):
        build_index(_cfg(export, synth_small["manifest"], out), quiet=True)
    with pytest.raises(ConfigError, match=f"has no re-ranker features for its {windowed['full']['count']} clips"):
        build_index(_cfg(export, synth_small["manifest"], windowed["out"], *WINDOWS,
                         f"index.rerank_checkpoint={tight}"), quiet=True)
    assert store.read_meta(out)["count"] == count and len(store.parts(out)) == 1


def test_progress_in_a_log_is_whole_lines_ending_at_the_total(ray_local, export, synth_small, tmp_path,
                                                               capsys, monkeypatch):
    """Under `ray job logs` or a file, stdout is no terminal: progress comes as whole lines (at
    most one per PROGRESS_S, here every batch), not updates joined by carriage returns."""
    import serve.index as index

    monkeypatch.setattr(index, "PROGRESS_S", 0.0)
    meta = index.build_index(_cfg(export, synth_small["manifest"], tmp_path / "idx", "index.split=test",
                                  "index.batch=4"), quiet=False)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines, n = [line for line in out.splitlines() if " clips done, " in line], meta["count"]
    done = [int(line.split()[0].split("/")[0]) for line in lines]
    assert len(done) == -(-n // 4) and done == sorted(done) and done[-1] == n  # one line per batch of 4
    assert all(f"/{n} clips done, 0 of them skipped" in line for line in lines)
    # the rate counts from the first batch back (not Ray's and the actors' start): none yet there.
    # That batch is whichever the actors finish first: one of 4 clips, or the last one's remainder
    assert done[0] in (4, n % 4 or 4), done
    assert lines[0] == f"  {done[0]}/{n} clips done, 0 of them skipped (rate and ETA when the next batch is back)"
    # the last: the rate since the first batch, and no ETA with nothing left
    assert re.fullmatch(rf"  {n}/{n} clips done, 0 of them skipped \([0-9]+\.[0-9] clips/s\)", lines[-1]), lines[-1]


def test_the_index_progress_rate_counts_from_the_first_batch_back(capsys, monkeypatch):
    """The rate and ETA of `clipray index` counted from the command's start, Ray's and the
    actors' start-up in it, so the early ETA was too long; and 'embedded 100/100 clips,
    skipped 5' read as 100 embedded. By hand: 20 clips in the 10 s since the first batch's 10.
    The clock is fixed: read twice, a pause of 0.15 s between the reads printed ETA 36s."""
    import types

    import serve.index
    from clipray.manifest import Every
    from serve.index import _progress

    monkeypatch.setattr(serve.index, "time", types.SimpleNamespace(perf_counter=lambda: 110.0))
    _progress(30, 100, 3, (100.0, 10), Every(0.0))
    assert capsys.readouterr().out == "  30/100 clips done, 3 of them skipped (2.0 clips/s, ETA 35s)\n"


def test_the_index_progress_line_says_no_rate_it_has_not_measured_and_no_eta_at_the_end(capsys, monkeypatch):
    """An append of 7 clips, one batch, printed '7/7 clips done, 2 of them skipped (0.0 clips/s,
    ETA when the next batch is back)', and a first build's first batch '8/40 clips done, ...
    (0.0 clips/s, ...)': the rate was 0.0 until a second batch was back, with clips done, and
    an ETA was promised with none left. Now: no rate until one is measured, no ETA at the end, a
    slow rate not printed as 0.0. The rate counts the skipped clips as the count does: 90 clips
    (5 skipped) come back in the 10 s since the first batch's 10 are 9.0 clips/s. The clock is
    fixed at 110 s."""
    import sys
    import types

    import serve.index
    from clipray.manifest import Every
    from serve.index import _progress

    monkeypatch.setattr(serve.index, "time", types.SimpleNamespace(perf_counter=lambda: 110.0))
    for args in ((8, 40, 0, (110.0, 8)), (7, 7, 2, (110.0, 7)), (3, 3, 3, (110.0, 3)),
                 (100, 100, 5, (100.0, 10)), (11, 100, 0, (80.0, 10))):
        _progress(*args, Every(0.0))
    assert capsys.readouterr().out.splitlines() == [
        "  8/40 clips done, 0 of them skipped (rate and ETA when the next batch is back)",
        "  7/7 clips done, 2 of them skipped",
        "  3/3 clips done, 3 of them skipped",
        "  100/100 clips done, 5 of them skipped (9.0 clips/s)",
        "  11/100 clips done, 0 of them skipped (0.033 clips/s, ETA 2670s)"]
    # on a terminal each line overwrites the one before: the rest of a longer one is cleared (a
    # shorter line after the first left its tail: '(2.0 clips/s, ETA 12s)  e next batch is back)')
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _progress(8, 40, 0, (110.0, 8), Every(None))
    _progress(40, 40, 0, (100.0, 10), Every(None))
    assert capsys.readouterr().out == ("\r  8/40 clips done, 0 of them skipped (rate and ETA when the next batch is back)\x1b[K"
                                       "\r  40/40 clips done, 0 of them skipped (3.0 clips/s)\x1b[K")


def test_row_ids_follow_the_manifest_whatever_order_the_actors_finish_in(ray_local, export, synth_small,
                                                                         tmp_path, monkeypatch, capsys):
    """The same command gives the same clip ids: the embedding actors' batches come back in the
    order they finish (two actors: another order from run to run), reversed here, and the row
    ids (the served clip ids) and the skip report still follow the manifest. The summary counts
    the skips by reason and names the report (it said '2 skipped' and no more)."""
    import ray.data

    from clipray.manifest import read_manifest, resolve_path, write_manifest
    from serve import store
    from serve.index import build_index

    iter_batches = ray.data.Dataset.iter_batches
    monkeypatch.setattr(ray.data.Dataset, "iter_batches",
                        lambda self, **kw: reversed(list(iter_batches(self, **kw))))
    manifest = tmp_path / "m.parquet"
    rows = [r for r in read_manifest(synth_small["manifest"]).to_pylist() if r["split"] == "test"]
    root = Path(synth_small["manifest"]).parent
    rows = [dict(r, path=resolve_path(r["path"], str(root))) for r in rows]
    rows.insert(1, dict(rows[0], video_id="gone0", path=str(tmp_path / "gone0.mp4")))
    rows.insert(3, dict(rows[0], video_id="gone1", path=str(tmp_path / "gone1.mp4")))  # skipped
    write_manifest([{k: v for k, v in r.items() if k != "row_id"} for r in rows], manifest)
    out = tmp_path / "idx"
    build_index(_cfg(export, str(manifest), out, "index.split=test", "index.batch=1"), quiet=True)
    t = store.read_table(out)
    assert t.column("video_id").to_pylist() == [r["video_id"] for r in rows if not r["video_id"].startswith("gone")]
    skipped = [json.loads(line)["video_id"] for line in (out / "skip_report.jsonl").read_text().splitlines()]
    assert skipped == ["gone0", "gone1"]
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"  skipped 2 clips {{'missing file': 2}}; each with its reason in {out / 'skip_report.jsonl'}"


def test_a_clip_skipped_again_is_listed_once_and_one_fixed_since_is_dropped(ray_local, export, synth_small, tmp_path,
                                                                          capsys):
    """A clip that could not be embedded is tried again by every run: an unchanged re-run added
    it to skip_report.jsonl once more (two runs, two lines for one clip), and once its file was
    there its old line stayed, though the clip was indexed. A line for a clip no run tries again
    (not in this manifest) stays. A window past its video's end (9.0 for a 4 s video) was indexed
    without a word: it is listed once in cut_report.jsonl and counted in the summary; it keeps the
    manifest's window (its identity: a re-run does not embed it again), and its vector is that of
    the frames up to the video's end."""
    import shutil

    from clipray.manifest import read_manifest, resolve_path, write_manifest
    from clipray.video import decode_clip, video_length
    from serve import store
    from serve.deployments import Searcher
    from serve.index import build_index

    root = Path(synth_small["manifest"]).parent
    rows = [dict(r, path=resolve_path(r["path"], str(root))) for r in read_manifest(synth_small["manifest"]).to_pylist()
            if r["split"] == "test"][:2]
    rows.append(dict(rows[1], video_id="cut", start=0.5, end=9.0))
    length = video_length(rows[1]["path"])  # 4.0 s
    gone = tmp_path / "later.mp4"
    rows.append(dict(rows[0], video_id="later", path=str(gone)))
    manifest = tmp_path / "m.parquet"
    write_manifest([{k: v for k, v in r.items() if k != "row_id"} for r in rows], manifest)
    out = tmp_path / "idx"
    report = out / "skip_report.jsonl"
    out.mkdir()
    elsewhere = {"video_id": "other", "path": str(tmp_path / "other.mp4"), "start": None, "end": None,
                 "reason": "missing file"}
    report.write_text(json.dumps(elsewhere) + "\n")  # from a run over another manifest
    cfg = _cfg(export, str(manifest), out, "index.split=test", "index.batch=1")
    cut_line = f"  1 clip cut at its video's end (see {out / 'cut_report.jsonl'})"
    for run in range(2):
        capsys.readouterr()
        build_index(cfg, quiet=True)
        lines = [json.loads(line) for line in report.read_text().splitlines()]
        assert lines == [elsewhere, {"video_id": "later", "path": str(gone), "start": rows[0]["start"],
                                     "end": rows[0]["end"], "reason": "missing file"}]
        assert (cut_line in capsys.readouterr().out.splitlines()) == (run == 0)  # embedded by the first run only
        assert [json.loads(line) for line in (out / "cut_report.jsonl").read_text().splitlines()] == [
            {"video_id": "cut", "path": rows[1]["path"], "start": 0.5, "end": 9.0, "length": length}]
    t = store.read_table(out)
    assert t.column("video_id").to_pylist() == [r["video_id"] for r in rows[:3]]
    assert (t["start"][2].as_py(), t["end"][2].as_py()) == (0.5, 9.0)
    # its frames are those of [0.5, length]: the same as a row that gives that window
    video = cfg.video
    assert decode_clip(rows[1]["path"], 0.5, 9.0, video).indices == decode_clip(rows[1]["path"], 0.5, length,
                                                                                   video).indices
    s = Searcher.func_or_class(str(out), {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    hits = s.search_many([(store.read_embeddings(out)[2], 3)])[0]
    assert {"clip_id": 2, "video_id": "cut", "start": 0.5, "end": 9.0} in [
        {k: h[k] for k in ("clip_id", "video_id", "start", "end")} for h in hits]
    shutil.copyfile(resolve_path(rows[0]["path"], str(root)), gone)
    build_index(cfg, quiet=True)
    assert [json.loads(line) for line in report.read_text().splitlines()] == [elsewhere]
    assert store.read_table(out).column("video_id").to_pylist() == [r["video_id"] for r in rows]


def test_another_model_cannot_append(windowed, synth_small, tmp_path):
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.index import build_index

    other = save_export(create_model("test_meanP"), tmp_path / "other")
    with pytest.raises(ConfigError, match="another model"):
        build_index(_cfg(str(other), synth_small["manifest"], windowed["out"]), quiet=True)
    skip = windowed["out"] / "skip_report.jsonl"
    assert not skip.exists() or all(json.loads(line)["reason"] for line in skip.read_text().splitlines())


def test_an_append_sampled_unlike_the_index_is_refused(windowed, export, synth_small):
    """The index records one sampling, with which the app decodes query uploads; an append at
    another video.fps/max_frames/slice embedded its clips that way and overwrote the record,
    so the index held vectors of two samplings and the older clips were queried unlike their own."""
    from serve import store
    from serve.index import build_index

    out = windowed["out"]
    held = store.read_meta(out)
    for overrides, said in ((["video.fps=3"], f"video.fps={held['video']['fps']}; this append asks video.fps=3.0"),
                            (["video.max_frames=5", "video.slice=head"],
                             f"video.max_frames={held['video']['max_frames']} video.slice={held['video']['slice']}; "
                             "this append asks video.max_frames=5 video.slice=head")):
        with pytest.raises(ConfigError, match=f"^{out} holds clips sampled with {said}: give the former"):
            build_index(_cfg(export, synth_small["manifest"], out, *WINDOWS, *overrides), quiet=True)
    assert store.read_meta(out) == held  # nothing written


def test_a_fetch_killed_midway_is_removed_by_the_next_but_not_one_running_now(tmp_path):
    """A `clipray index` (or `clipray serve`) killed while it fetched an export from a URI left
    its `.fetch-*` folder, weights and all, in the index folder for good. The next fetch into the
    folder removes such folders, unless a fetch is running there now (in another process: it
    holds a shared lock on the folder), whose folder it cannot tell from a stale one."""
    import fcntl
    import os

    import fsspec

    from clipray.export import CONFIG, WEIGHTS
    from serve import store
    from serve.index import _local_export

    mem, uri = fsspec.filesystem("memory"), "memory://fetch-test/export"
    mem.pipe({f"/fetch-test/export/{WEIGHTS}": b"weights", f"/fetch-test/export/{CONFIG}": b"{}"})
    out = tmp_path / "idx"
    stale = out / ".fetch-killed"
    stale.mkdir(parents=True)
    (stale / WEIGHTS).write_bytes(b"weigh")  # cut where the kill came
    running = os.open(out, os.O_RDONLY)  # another fetch, running now
    try:
        fcntl.flock(running, fcntl.LOCK_SH)
        keep = _local_export(uri, "checkpoint", out)
    finally:
        os.close(running)
    assert stale.is_dir()  # (it may be the running fetch's)
    assert keep == str(out / f"model-{store.fingerprint(keep)}")
    assert _local_export(uri, "checkpoint", out) == keep
    assert sorted(p.name for p in out.iterdir()) == [Path(keep).name]
    mem.rm("/fetch-test", recursive=True)


def test_export_at_a_uri_is_copied_into_the_index(ray_local, s3_server, export, synth_small, tmp_path):
    """A run kept in object storage keeps its export there: `checkpoint=s3://...` builds the same
    index as the export on disk, into an index that holds its own copy of the model (so serving
    needs no bucket); a wrong or empty checkpoint fails naming the key, before anything runs."""
    if s3_server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    from serve import store
    from serve.app import _export_for
    from serve.config import load_app_config
    from serve.index import build_index

    s3 = s3_server.ensure_bucket()
    s3.fs().put(export, f"{s3.bucket}/runs/r1/export", recursive=True)
    uri, manifest = s3.url("runs/r1/export"), synth_small["manifest"]
    disk = build_index(_cfg(export, manifest, tmp_path / "disk", "index.split=test"), quiet=True)
    remote = build_index(_cfg(uri, manifest, tmp_path / "remote", "index.split=test"), quiet=True)
    fp = store.fingerprint(export)
    assert disk["fingerprint"] == remote["fingerprint"] == fp
    assert remote["export"] == str((tmp_path / "remote" / f"model-{fp}").absolute())
    assert store.fingerprint(remote["export"]) == fp
    assert not list((tmp_path / "remote").glob(".fetch-*"))

    def vectors(out):  # by clip, since the job may finish its batches in any order
        t = store.read_table(out).sort_by([("path", "ascending"), ("start", "ascending")])
        return t.column("path").to_pylist(), embedding_matrix(t)

    (paths_d, x_d), (paths_r, x_r) = vectors(tmp_path / "disk"), vectors(tmp_path / "remote")
    assert paths_d == paths_r and len(paths_d) == disk["count"] > 0
    np.testing.assert_allclose(x_r, x_d, atol=1e-5)
    # serving with checkpoint=URI: the same weights, so the index's own copy serves
    assert _export_for(_cfg(uri, manifest, tmp_path / "remote"), remote) == remote["export"]

    with pytest.raises(ConfigError, match=r"checkpoint=s3://\S+/runs/none/export: no clipray export"):
        build_index(_cfg(s3.url("runs/none/export"), manifest, tmp_path / "none"), quiet=True)
    assert not (tmp_path / "none").exists()  # nor its half-fetched copy
    with pytest.raises(ConfigError, match=r"^checkpoint: give an export directory"):
        build_index(load_app_config(None, [f"manifest={manifest}", f"out={tmp_path / 'none'}"]), quiet=True)


def test_plan_streams_the_manifest_into_unique_clips_and_a_caption_sample(synth_small, tmp_path):
    import os

    from clipray.manifest import read_manifest
    from serve.index import plan_clips

    whole = read_manifest(synth_small["manifest"], split="test").to_pylist()
    root = os.path.dirname(os.path.abspath(synth_small["manifest"]))
    # brute force: one clip per distinct (path, start, end), in manifest order
    want = list({(f"{root}/{r['path']}", r["start"], r["end"]): r["video_id"] for r in whole}.items())
    cfg = _cfg("unused", synth_small["manifest"], tmp_path, "index.split=test", "index.recall_queries=100000")
    rows, captions = plan_clips(cfg, have=set())
    assert [((r["path"], r["start"], r["end"]), r["video_id"]) for r in rows] == want
    assert captions == sorted({r["caption"] for r in whole})  # room for all: every caption
    few = _cfg("unused", synth_small["manifest"], tmp_path, "index.split=test", "index.recall_queries=5")
    picked = plan_clips(few, have=set())[1]
    assert 1 <= len(picked) <= 5 and set(picked) <= set(captions)
    assert plan_clips(few, have=set())[1] == picked  # seeded: the same sample every build
    # clips already in the index are not planned again
    from serve import store

    have = {store.clip_key(p, s, e) for (p, s, e), _ in want[:3]}
    assert [((r["path"], r["start"], r["end"]), r["video_id"]) for r in plan_clips(cfg, have)[0]] == want[3:]


def test_plan_says_the_clips_the_index_holds_under_other_video_ids(synth_small, tmp_path, capsys):
    """Clips are matched by file and times: a manifest that gives indexed clips new video ids
    planned '0 new' and the index went on serving the old ids, without a word."""
    import os

    from clipray.manifest import read_manifest
    from serve import store
    from serve.index import plan_clips

    whole = read_manifest(synth_small["manifest"], split="test").to_pylist()
    root = os.path.dirname(os.path.abspath(synth_small["manifest"]))
    want = list({(f"{root}/{r['path']}", r["start"], r["end"]): r["video_id"] for r in whole}.items())
    cfg = _cfg("unused", synth_small["manifest"], tmp_path, "index.split=test")
    same = {store.clip_key(*key): vid for key, vid in want}
    assert plan_clips(cfg, same)[0] == [] and capsys.readouterr().err == ""  # the same ids: nothing to say
    ids = dict(same)
    for key, vid in want[1:3]:  # two clips indexed under ids the manifest no longer gives
        ids[store.clip_key(*key)] = f"old-{vid}"
    assert plan_clips(cfg, ids)[0] == []
    (path, s, e), vid = want[1]
    span = "" if s is None else f" {s:g}-{e:g}s"
    assert capsys.readouterr().err == (
        f"[index] note: 2 clips of the manifest are in the index under other video ids (e.g. {path}{span}: "
        f"'old-{vid}' in the index, '{vid}' in the manifest); clips are matched by file and times, and the index "
        "keeps its ids: to serve the manifest's, build a new index (another out=)\n")


def test_plan_opens_the_videos_it_measures_for_windows_several_at_a_time(synth_small, tmp_path, monkeypatch):
    """Sliding windows need each whole video's length: plan_clips opened the videos without a
    `duration` one after another in the driver, a day for a million videos in object storage
    before the first clip was embedded. They are opened several at a time now; each video
    once, with the windows of its length, in manifest order."""
    import os
    import threading

    import clipray.video
    from clipray.manifest import read_manifest, write_manifest
    from serve.index import plan_clips, windows

    whole = read_manifest(synth_small["manifest"], split="test").to_pylist()
    root = os.path.dirname(os.path.abspath(synth_small["manifest"]))
    manifest = tmp_path / "no-durations.parquet"  # whole videos, length unknown
    write_manifest([dict(r, path=f"{root}/{r['path']}", start=None, end=None, duration=None) for r in whole],
                   manifest)
    length = {f"{root}/{r['path']}": 3.0 + len(r["path"]) % 3 for r in whole}
    lock, opened, running, met = threading.Lock(), [], [0], threading.Event()

    def probe(path, backend="decord"):
        with lock:
            opened.append(path)
            running[0] += 1
            if running[0] > 1:
                met.set()
        met.wait(5)  # the first video waits for a second one to be opened beside it
        with lock:
            running[0] -= 1
        return length[path]

    monkeypatch.setattr(clipray.video, "probe_duration", probe)
    cfg = _cfg("unused", str(manifest), tmp_path, "index.window_s=2", "index.stride_s=1")
    rows = plan_clips(cfg, have=set())[0]
    assert met.is_set(), "the videos were opened one after another"
    assert sorted(opened) == sorted(length)  # each once
    paths = list(dict.fromkeys(f"{root}/{r['path']}" for r in whole))
    assert [(r["path"], r["start"], r["end"]) for r in rows] == \
        [(p, s, e) for p in paths for s, e in windows(length[p], 2.0, 1.0)]


def test_plan_keys_a_batch_at_a_time_the_clips_clip_key_gives_row_by_row(tmp_path):
    """plan_clips took 10-17 s a million rows: a clip_key, a path resolved and a random draw for
    each row. Keys are now made a column at a time (store.clip_ms) and paths once a batch; the
    clips are the ones a row-by-row pass with store.clip_key plans, in its order:
    the same clip written two ways (../, half milliseconds) once, clips already indexed left
    out, each video's windows once, across shards."""
    import pyarrow as pa

    from clipray.manifest import read_manifest, write_manifest
    from serve import store
    from serve.index import plan_clips, windows

    # a video's file written two ways (a video_id naming two files is refused)
    spellings = (("videos/v{}.mp4", "./videos/../videos/v{}.mp4"), ("/data/v{}.mp4",) * 2, ("s3://b/v{}.mp4",) * 2)
    rows = [dict(video_id=f"v{i // 6}", path=spellings[(i // 6) % 3][i % 4 // 2].format(i // 6),
                 caption=f"c{i % 9}", split="test" if i % 5 else "train",
                 start=None if i % 7 == 0 else 0.0005 + 1.0015 * (i % 3), end=None if i % 7 == 0 else 2.0025 + i % 3,
                 duration=3.5 + (i // 6) % 3) for i in range(240)]
    write_manifest(rows, tmp_path / "m", rows_per_shard=50)  # five shards, a video's rows across two
    whole = read_manifest(tmp_path / "m", split="test").to_pylist()
    root = str(tmp_path / "m")
    resolved = lambda p: p if "://" in p or p.startswith("/") else os.path.abspath(f"{root}/{p}")  # noqa: E731
    have = {store.clip_key(resolved(r["path"]), r["start"], r["end"]) for r in whole[10:14]}
    for extra in ([], WINDOWS):
        seen, want = set(have), []  # brute force: every row's clips through clip_key
        for r in whole:
            spans = [(r["start"], r["end"])]
            if extra and r["start"] is None:
                spans = windows(r["duration"], 2.0, 1.0)
            for s, e in spans:
                if store.clip_key(resolved(r["path"]), s, e) not in seen:
                    seen.add(store.clip_key(resolved(r["path"]), s, e))
                    want.append({"video_id": r["video_id"], "path": resolved(r["path"]), "start": s, "end": e})
        got = plan_clips(_cfg("unused", str(tmp_path / "m"), tmp_path, "index.split=test", *extra), have)[0]
        assert got == want
        assert extra or len(want) < len(whole) - len(have)  # (clips written twice: planned once)
    # an append's clips already indexed: their keys a column at a time too
    table = pa.table({"path": [g["path"] for g in got], "start": [g["start"] for g in got],
                      "end": [g["end"] for g in got], "video_id": [g["video_id"] for g in got]})
    assert store.existing_ids(table) == {store.clip_key(g["path"], g["start"], g["end"]): g["video_id"] for g in got}
    assert store.existing_ids(pa.table({"path": [], "start": [], "end": [], "video_id": []})) == {}  # (no part yet)
    times = [None, float("nan"), 0.0, 0.0005, 0.0015, 0.0025, 1.0025, 2.0025, 1e15 + 0.5, 4.6e15, 12345.6785, 1e17]
    for ts in (times, times[:-1]):  # (1e17 s is past int64 in ms: the column goes through clip_key)
        assert store.clip_ms(pa.array(ts, pa.float64())) == [store.clip_key("", t, None)[1] for t in ts]


def test_ivf_pq_on_too_few_clips_fails_before_embedding(ray_local, export, synth_small, tmp_path):
    from serve import store
    from serve.index import build_index, plan_clips

    n = len(plan_clips(_cfg("unused", synth_small["manifest"], tmp_path), have=set())[0])
    with pytest.raises(ConfigError, match=rf"0 clips indexed \+ {n} new from .*; ivf_pq needs >= "
                                          rf"{store.PQ_MIN_VECTORS} vectors to train its codebooks, got {n}"):
        build_index(_cfg(export, synth_small["manifest"], tmp_path / "pq", "index.kind=ivf_pq"), quiet=True)
    assert not (tmp_path / "pq").exists()  # nothing embedded, no empty index left behind
    assert store.too_few_for("ivf_pq", store.PQ_MIN_VECTORS) == store.too_few_for("hnsw", 1) == ""


def test_an_index_folder_or_export_that_is_not_one_fails_before_ray_starts(synth_small, tmp_path, monkeypatch):
    from serve.index import build_index

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=rf"out: cannot create the index folder {tmp_path}/afile/index "
                                          r"\(\[Errno 20\] Not a directory"):
        build_index(_cfg("unused", synth_small["manifest"], tmp_path / "afile" / "index"), quiet=True)
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}: not a clipray export, no config.json in it "
                                                r"\(a training run writes its export to RUN_DIR/export\)"):
        build_index(_cfg(str(tmp_path), synth_small["manifest"], tmp_path / "index"), quiet=True)
    for text, says in (("garbage{", "not valid JSON"), ('{"format": "other/2"}', "format 'other/2' where "
                                                      "'clipray.export/1' was expected")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"^{tmp_path}/config.json: not a clipray export, {says}"):
            build_index(_cfg(str(tmp_path), synth_small["manifest"], tmp_path / "index"), quiet=True)
    assert not (tmp_path / "index").exists()  # the folder each failed try made is gone again
    # a second run into an index folder another run is writing (its lock held here) is refused
    # before anything: both runs numbered their part and row ids after what they saw, and one
    # replaced the other's part without a word (or the index failed every later read)
    import fcntl

    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".index.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=rf"^out={tmp_path}/busy: another `clipray index` is writing this "
                                              r"index now; run this one when it has finished"):
            build_index(_cfg(str(tmp_path), synth_small["manifest"], tmp_path / "busy"), quiet=True)
    with pytest.raises(ConfigError, match="not a clipray export"):  # released: the next run goes on
        build_index(_cfg(str(tmp_path), synth_small["manifest"], tmp_path / "busy"), quiet=True)
    # two runs started at once on a new folder: this one finds none, the other makes it and takes
    # the lock (here, as this run makes the folder too). The refused run removed the folder,
    # the other's lock with it, and a third run then wrote beside the first (row ids 0, 0, 1, 1)
    race, real_mkdir = tmp_path / "race", Path.mkdir

    def other_run_first(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == race and not others:
            others.append(open(race / ".index.lock", "a"))
            fcntl.flock(others[0], fcntl.LOCK_EX | fcntl.LOCK_NB)

    others: list = []
    monkeypatch.setattr(Path, "mkdir", other_run_first)
    with pytest.raises(ConfigError, match="another `clipray index` is writing this index now"):
        build_index(_cfg(str(tmp_path), synth_small["manifest"], race), quiet=True)
    monkeypatch.undo()
    assert (race / ".index.lock").is_file()  # the other run's folder and lock stay
    others[0].close()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match="not a clipray export"):  # a folder the user made stays
        build_index(_cfg(str(tmp_path), synth_small["manifest"], tmp_path / "mine"), quiet=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"


def test_a_manifest_uri_of_no_known_scheme_or_an_unreadable_part_is_one_line(export, tmp_path):
    """A manifest at https:// (or S3:// in capitals) was pyarrow's ArrowInvalid traceback, with
    the new index folder left behind; an embeddings part that is no Parquet (cut short by a
    copy) was a traceback at the next append, and at every read of the index."""
    from clipray.manifest import ManifestError
    from serve import store
    from serve.index import build_index

    for uri in ("https://example.com/m.parquet", "S3://bucket/m.parquet"):
        with pytest.raises(ManifestError, match=rf"^{uri}: Unrecognized filesystem type in URI: {uri} \(a manifest "
                                                r"is a local path or an s3://, gs:// or hdfs:// URI\)$"):
            build_index(_cfg(export, uri, tmp_path / "new"), quiet=True)
    assert not (tmp_path / "new").exists()
    out = tmp_path / "index"
    store.write_part(out, {"row_id": np.arange(2), "video_id": ["a", "b"], "start": [0.0, 1.0], "end": [1.0, 2.0],
                           "path": ["/a.mp4", "/b.mp4"], "embedding": _unit(2, 4)}, fingerprint="f")
    good = store.read_table(out)
    assert store.part_fingerprints(out) == {"f"} and store.read_embeddings(out).shape == (2, 4)
    (out / store.EMB_DIR / "part-00001.parquet").write_bytes((out / store.EMB_DIR / "part-00000.parquet").read_bytes()[:-9])
    said = rf"^{out}/{store.EMB_DIR}/part-00001.parquet: not a readable embeddings part \(.*\): copy the whole index"
    for read in (store.read_table, store.part_fingerprints, store.read_embeddings):
        with pytest.raises(ConfigError, match=said):
            read(out)
    with pytest.raises(ConfigError, match=said):
        build_index(_cfg(export, "unused.parquet", out), quiet=True)
    (out / store.EMB_DIR / "part-00001.parquet").unlink()
    assert store.read_table(out).equals(good)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_counts_a_clip_tied_with_the_exact_kth_as_a_hit():
    """Identical clips (a copied video, still windows) tie: exact search keeps one of the tied
    ids at the k-th place, an IVF index probing every list (so itself exact) may keep another.
    Recall was counted by id and came out 0.91 for an exact search; by score it is 1.0."""
    import faiss

    from serve import store

    base = _unit(300, 16)
    x = np.repeat(base, 4, axis=0)  # every clip four times
    q = base[:50] + 0.01 * np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
    exact = faiss.IndexFlatIP(16)
    exact.add(x)
    index, params = store.build_faiss(x, "ivf_flat")
    store.set_search_params(index, nprobe=params["nlist"])  # every list: an exact search
    assert store.recall_at_k(index, exact, q)["recall@10"] == 1.0
    # brute force: a clip counts when its exact score reaches the exact 10th score
    hnsw, _ = store.build_faiss(x, "hnsw", hnsw_m=4)
    store.set_search_params(hnsw, ef_search=10)
    _, got = hnsw.search(q, 10)
    s = q @ x.T
    kth = np.sort(s, axis=1)[:, -10:-9]
    want = sum(len({i for i in g if i >= 0 and s[j, i] >= kth[j, 0] - 1e-5}) for j, g in enumerate(got)) / 500
    assert store.recall_at_k(hnsw, exact, q)["recall@10"] == pytest.approx(want)
    # a caption the model gives a NaN vector: faiss finds nothing for it, and recall counted it
    # as a miss without a word (0.98 of an exact index); evaluation fails on such a vector too
    q[7] = np.nan
    with pytest.raises(ConfigError, match=r"1 of 50 recall queries are not finite \(NaN/inf\), the first query 7:"):
        store.recall_at_k(index, exact, q)
    with pytest.raises(ConfigError, match=r"the first caption 'c7'"):
        store.recall_at_k(index, exact, q, captions=[f"c{i}" for i in range(50)])


def test_an_unreadable_or_mismatched_faiss_file_is_a_clear_error(tmp_path):
    """A truncated, empty or missing index.faiss raised faiss's C++ assertion text from the
    Searcher replica; one holding another count or dim than index.json served ids the clip
    table lacks (an IndexError per search) or failed on the first query."""
    from serve import store

    out = tmp_path / "an index"
    out.mkdir()
    x = _unit(200, 16)
    index, _ = store.build_faiss(x, "flat")
    store.save_faiss(out, index)
    meta = {"count": 200, "dim": 16, "search": {}}
    loaded = store.load_faiss(out, meta)
    assert np.array_equal(loaded.search(x[:5], 7)[1], index.search(x[:5], 7)[1])  # round trip
    data = (out / store.FAISS).read_bytes()
    for bad in (data[: len(data) // 2], data[:-4], b"", b"not a faiss index"):
        (out / store.FAISS).write_bytes(bad)
        with pytest.raises(ConfigError, match=rf"^{out}/index.faiss: not a readable faiss index \(.+\): "
                                              r"rebuild it with `clipray index`"):
            store.load_faiss(out, meta)
    (out / store.FAISS).unlink()
    with pytest.raises(ConfigError, match=rf"^{out}/index.faiss: not a readable faiss index"):
        store.load_faiss(out, meta)
    store.save_faiss(out, store.build_faiss(x[:150], "flat")[0])
    with pytest.raises(ConfigError, match=rf"^{out}/index.faiss holds 150 vectors of dim 16 where "
                                          r"index.json says 200 of dim 16"):
        store.load_faiss(out, meta)
    store.save_faiss(out, store.build_faiss(_unit(200, 8), "flat")[0])
    with pytest.raises(ConfigError, match=r"holds 200 vectors of dim 8 where index.json says 200 of dim 16"):
        store.load_faiss(out, meta)


def test_rerank_features_of_an_interrupted_append_are_ignored_not_an_index_error(tmp_path):
    """An append writes its re-ranker part before its embeddings part. Interrupted between the
    two, it leaves features for row ids the index never got; a later, smaller append reuses
    some of those ids and the rest lie past the index's count: read_rerank raised IndexError
    and the Reranker replica could not start."""
    from serve import store

    rng = np.random.default_rng(0)

    def part(ids):
        ids = np.asarray(ids, np.int64)
        feats = rng.standard_normal((len(ids), 3, 4)).astype(np.float16)
        mask = rng.integers(0, 2, (len(ids), 3)).astype(np.uint8)
        store.write_part(tmp_path, {"row_id": ids, "feats": feats, "mask": mask}, sub=store.RERANK_DIR)
        return feats, mask

    f0, m0 = part(range(5))        # the first build: rows 0-4
    part(range(5, 10))             # an append interrupted before its embeddings part
    f2, m2 = part(range(5, 7))     # the next append: rows 5-6, count 7
    feats, mask = store.read_rerank(tmp_path, 7)
    np.testing.assert_array_equal(feats, np.concatenate([f0, f2]))
    np.testing.assert_array_equal(mask, np.concatenate([m0, m2]))


def test_rerank_features_of_an_index_copied_without_one_of_their_parts_fail_to_start_saying_so(tmp_path):
    """An index copied without one of its rerank/ parts (an append's): read_rerank gave its rows
    all-zero features and masks, and the Reranker started; every search that drew one of them
    as a candidate then failed in the cross-encoder (a clip with no valid frame), a 500. The
    Searcher refuses a copy without an embeddings part; the Reranker now refuses this one."""
    from serve import store

    rng = np.random.default_rng(0)
    for ids in (range(3), range(3, 6)):  # a build and an append
        store.write_part(tmp_path, {"row_id": np.arange(ids.start, ids.stop), "feats": rng.standard_normal(
            (3, 2, 4)).astype(np.float16), "mask": np.ones((3, 2), np.uint8)}, sub=store.RERANK_DIR)
    assert store.read_rerank(tmp_path, 6)[1].all(1).all()
    store.parts(tmp_path, store.RERANK_DIR, ".npz")[1].unlink()
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: its rerank/ parts hold no re-ranker features for 3 of its "
                                          r"6 clips \(row ids \[3, 4, 5\]\): a part was left out of a copy; copy the "
                                          "whole index folder again"):
        store.read_rerank(tmp_path, 6)


def test_vectors_that_are_not_finite_are_refused_clearly_by_every_kind():
    """A NaN/inf embedding (an fp16 model overflowing) broke an IVF index's k-means with faiss's
    C++ assertion text after every clip was embedded, and hid in a flat or HNSW one, where no
    query ever finds it."""
    from serve import store

    x = _unit(400, 16)
    x[7], x[300, 3] = np.nan, np.inf
    for kind in ("flat", "hnsw", "ivf_flat", "ivf_sq8"):
        with pytest.raises(ConfigError, match=r"^2 of 400 vectors are not finite \(NaN/inf\), rows \[7, 300\]"):
            store.build_faiss(x, kind)


def test_a_clip_whose_embedding_is_not_finite_is_skipped_with_a_reason(synth_small, tmp_path):
    from clipray.config import VideoConfig
    from clipray.export import save_export
    from clipray.manifest import read_manifest
    from clipray.models import create_model
    from serve.index import ClipEmbedder

    export = save_export(create_model("test_meanP"), tmp_path / "export")
    tight = save_export(create_model("test_tightTransf"), tmp_path / "tight")
    emb = ClipEmbedder(str(export), VideoConfig(max_frames=4), str(tight), use_gpu=False)
    encode, frames = emb.model.encode_video, emb.tight.encode_frames

    def first_nan(x, m):  # what an overflowing fp16 model gives for one clip
        v = encode(x, m)
        v[0] = float("nan")
        return v

    def third_large(x, m):  # finite in float32, past float16's 65504 as the features are stored
        f = frames(x, m)
        f[2, 0, 0] = 7e4
        return f

    emb.model.encode_video, emb.tight.encode_frames = first_nan, third_large
    root = Path(synth_small["manifest"]).parent
    paths = [str(root / r["path"]) for r in read_manifest(synth_small["manifest"]).to_pylist()[:4]]
    out = emb({"video_id": np.array(["a", "b", "c", "d"], object), "path": np.array(paths, object),
               "start": np.array([np.nan] * 4), "end": np.array([np.nan] * 4)})
    assert out["skip"][0].startswith("the model's embedding of this clip is not finite")
    # the re-ranker scored such a clip NaN: every query with it among its candidates failed (500)
    assert out["skip"][2].startswith("the re-ranker's frame features of this clip are not finite")
    assert list(out["skip"][[1, 3]]) == ["", ""] and np.isfinite(out["embedding"][[1, 3]]).all()
    assert np.isfinite(out["rerank_feats"][[1, 3]]).all()


def test_a_clip_the_re_ranker_decodes_again_and_fails_is_a_skip_not_a_failed_job(synth_small, tmp_path, monkeypatch):
    """A re-ranker of another image size decodes each clip again, at its size; a clip that
    failed there only (a timeout under load, a read error) left the two decodes with different
    counts of clips, and the actor, and with it the whole index job, failed on the shape."""
    import torch

    import clipray.video
    from clipray.config import VideoConfig
    from clipray.export import save_export
    from clipray.manifest import read_manifest
    from clipray.models import build_from_spec, create_model, get_spec
    from clipray.models.backbone import open_clip_config
    from clipray.video import SkipClip
    from serve.index import ClipEmbedder

    export = save_export(create_model("test_meanP"), tmp_path / "export")
    big = json.loads(json.dumps(open_clip_config(get_spec("test_tightTransf").open_clip_name)))
    big["vision_cfg"]["image_size"] = 48
    tight = save_export(build_from_spec("test_tightTransf", get_spec("test_tightTransf"), open_clip_cfg=big),
                        tmp_path / "tight")
    emb = ClipEmbedder(str(export), VideoConfig(max_frames=4), str(tight), use_gpu=False)
    assert (emb.video.size, emb.tight.image_size) == (32, 48)
    root = Path(synth_small["manifest"]).parent
    paths = [str(root / r["path"]) for r in read_manifest(synth_small["manifest"]).to_pylist()[:4]]
    decode = clipray.video.decode_clip_safe

    def slow_second(path, start, end, cfg, *a, **kw):
        if path == paths[1] and cfg.size == 48:
            raise SkipClip("decode timed out after 20.0s")
        return decode(path, start, end, cfg, *a, **kw)

    monkeypatch.setattr(clipray.video, "decode_clip_safe", slow_second)
    out = emb({"video_id": np.array(["a", "b", "c", "d"], object), "path": np.array(paths, object),
               "start": np.array([np.nan] * 4), "end": np.array([np.nan] * 4)})
    assert list(out["skip"]) == ["", "decode timed out after 20.0s (decoded again at 48px for the re-ranker)", "", ""]
    for i in (0, 2, 3):  # each kept clip's features are its own, as the re-ranker gives them alone
        c = decode(paths[i], None, None, VideoConfig(max_frames=4, size=48))
        with torch.no_grad():
            m = torch.from_numpy(c.mask[None]).bool()
            want = emb.tight.encode_frames(emb.tight.normalize(torch.from_numpy(c.frames[None])), m)
        assert out["rerank_mask"][i].tolist() == c.mask.tolist()
        np.testing.assert_allclose(out["rerank_feats"][i].astype(np.float32), want[0].half().float().numpy(), atol=2e-3)


def test_an_index_out_at_a_uri_is_refused_not_written_to_a_local_s3_folder(synth_small, tmp_path, monkeypatch):
    """out=s3://bucket/index made a local folder ./s3:/bucket/index (pathlib folds '//') and
    would have indexed into it, where serving on another machine never finds it. Serving an
    index copied to a URI said 'no index there; build one with `clipray index`' (it looked in a
    local s3:/bucket/index), which pointed at building again, not at the local path it needs."""
    from serve.app import app_from_config
    from serve.config import load_app_config
    from serve.index import build_index

    monkeypatch.chdir(tmp_path)
    for uri in ("s3://bucket/index", "gs://b/i"):
        with pytest.raises(ConfigError, match=rf"^out={uri}: the index folder is a local path"):
            build_index(_cfg("unused", synth_small["manifest"], uri), quiet=True)
        with pytest.raises(ConfigError, match=rf"^out={uri}: the index folder is read from a local path .*"
                                              r"not a URI: copy the index folder there$"):
            app_from_config(load_app_config(None, [f"out={uri}"]))
    assert list(tmp_path.iterdir()) == []


def test_index_and_serve_paths_under_the_home_folder_are_the_users(synth_small, tmp_path, monkeypatch):
    """`out: ~/index` in a serve YAML (or out=~/index where the shell leaves '~' as it is, as sh
    does after '=') built the index into a folder named '~' in the working directory, which
    `clipray serve` then found only from that directory; clipray train expands '~' in its paths."""
    from serve.config import load_app_config
    from serve.index import build_index

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.yaml").write_text("out: ~/index\ncheckpoint: ~/runs/r/export\nmanifest: ~/data/m.parquet\n"
                                      "index:\n  rerank_checkpoint: ~/runs/t/export\n")
    cfg = load_app_config(tmp_path / "app.yaml")
    assert (cfg.out, cfg.checkpoint, cfg.manifest, cfg.index.rerank_checkpoint) == (
        str(home / "index"), str(home / "runs/r/export"), str(home / "data/m.parquet"), str(home / "runs/t/export"))
    with pytest.raises(FileNotFoundError, match=rf"^{home}/runs/r/export: not a clipray export"):  # none there yet
        build_index(load_app_config(tmp_path / "app.yaml", [f"manifest={synth_small['manifest']}"]), quiet=True)
    assert not (tmp_path / "~").exists()


def test_a_part_cut_off_while_written_leaves_the_index_readable(tmp_path, monkeypatch):
    """write_part wrote straight into part-NNNNN.parquet / .npz: a run killed mid-write left a
    truncated part that every later read (the next append, the Searcher, the Reranker) failed
    on with a Parquet footer / zip error. A part now appears whole or not at all."""
    import pyarrow.parquet as pq

    from serve import store

    x = _unit(4, 8)
    rows = {"row_id": np.arange(4), "video_id": list("abcd"), "start": [0.0, 1.0, None, 2.0],
            "end": [1.0, 2.0, None, 3.0], "path": ["/v/a.mp4"] * 4, "embedding": x}
    store.write_part(tmp_path, rows)
    feats = {"row_id": np.arange(4), "feats": np.ones((4, 2, 3), np.float16), "mask": np.ones((4, 2), np.uint8)}
    store.write_part(tmp_path, feats, sub=store.RERANK_DIR)
    real_pq, real_savez = pq.write_table, np.savez

    def cut(where):  # the first half is on disk when the process dies
        if hasattr(where, "flush"):
            where.flush()
        p = Path(getattr(where, "name", where))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        raise KeyboardInterrupt

    def killed_pq(table, where, *a, **kw):
        real_pq(table, where, *a, **kw)
        cut(where)

    def killed_savez(where, **kw):
        real_savez(where, **kw)
        cut(where if hasattr(where, "flush") or str(where).endswith(".npz") else f"{where}.npz")

    more = dict(rows, row_id=np.arange(4, 8), path=["/v/b.mp4"] * 4)
    monkeypatch.setattr(pq, "write_table", killed_pq)
    with pytest.raises(KeyboardInterrupt):
        store.write_part(tmp_path, more)
    monkeypatch.setattr(np, "savez", killed_savez)
    with pytest.raises(KeyboardInterrupt):
        store.write_part(tmp_path, dict(feats, row_id=np.arange(4, 8)), sub=store.RERANK_DIR)
    monkeypatch.undo()
    t = store.read_table(tmp_path)
    assert t.column("row_id").to_pylist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(embedding_matrix(t), x)
    f, m = store.read_rerank(tmp_path, 4)
    assert f.shape == (4, 2, 3) and m.sum() == 8
    # the next run's part is numbered after the whole ones and read back
    store.write_part(tmp_path, more)
    assert store.read_table(tmp_path).column("row_id").to_pylist() == list(range(8))


def test_an_index_json_that_is_not_json_is_a_clear_error(tmp_path):
    """A hand-edited or cut-off index.json raised a JSONDecodeError traceback from `clipray
    serve` (and from an append) instead of naming the file."""
    from serve import store

    assert store.read_meta(tmp_path) is None
    store.write_meta(tmp_path, {"format": store.FORMAT, "count": 3})
    assert store.read_meta(tmp_path) == {"format": store.FORMAT, "count": 3}
    # another tool's index.json (a common name) in out=: a KeyError traceback from `clipray
    # serve` ('export') or `clipray index` ('fingerprint')
    for bad in ('{"count": 3', "", "[1, 2]", '{"files": ["a.html"], "version": 3}', '{"format": "clipray.index/0"}'):
        (tmp_path / store.META).write_text(bad)
        with pytest.raises(ConfigError, match=rf"^{tmp_path}/index.json: not an index's metadata \(.+\): "
                                              r"move it away and run `clipray index` with the same out= "):
            store.read_meta(tmp_path)


def test_embedding_parts_whose_row_ids_are_not_positions_are_refused(tmp_path):
    """A faiss id is a position in the table and the Reranker reads features by row id: that
    works only while row ids are 0..N-1. A part removed by hand (or two runs appending at once)
    broke it silently: re-ranked searches scored other clips' features, and the next append
    numbered its rows from the count, giving ids that were already taken."""
    from serve import store

    def part(ids):
        n = len(ids)
        store.write_part(tmp_path, {"row_id": np.asarray(ids), "video_id": ["v"] * n, "start": [None] * n,
                                    "end": [None] * n, "path": [f"/v/{i}.mp4" for i in ids],
                                    "embedding": _unit(n, 4)})

    part(range(3))
    part(range(3, 6))
    assert store.read_table(tmp_path).column("row_id").to_pylist() == list(range(6))
    part(range(6, 9))
    store.parts(tmp_path)[1].unlink()
    for cols in (None, store.META_COLUMNS, ["row_id", "embedding"]):
        with pytest.raises(ConfigError, match=rf"^{tmp_path}: the embedding parts' row ids are not 0..5 "
                                              r"\(\[0, 1, 2, 6, 7, 8\]\)"):
            store.read_table(tmp_path, cols)
    for p in store.parts(tmp_path):
        p.unlink()
    part(range(3))
    part(range(3, 5))  # two runs appending at once: both numbered their rows from 3
    part(range(3, 5))
    with pytest.raises(ConfigError, match=r"row ids are not 0..6 \(\[0, 1, 2, 3, 3, 4, 4\]\)"):
        store.read_table(tmp_path)


@pytest.mark.parametrize("knob,value,rule", [
    ("hnsw_m", 1, ">= 2"), ("hnsw_m", 0, ">= 2"), ("nprobe", 0, ">= 1"), ("ef_search", 0, ">= 1"),
    ("nlist", -3, ">= 0"), ("pq_m", -1, ">= 0"), ("refine", -1, ">= 0")])
def test_faiss_knobs_faiss_cannot_take_fail_before_embedding(synth_small, tmp_path, knob, value, rule):
    """The config took them all, and faiss then, after every clip was embedded: segfaulted
    (hnsw_m=1), aborted (hnsw_m=0), hung (hnsw_m<0), failed every search (nprobe=0, refine<0) or
    returned one clip per query whatever k (ef_search=0)."""
    from serve import store
    from serve.index import build_index

    with pytest.raises(ConfigError, match=rf"^index.{knob}={value} must be {rule}"):
        build_index(_cfg("unused", synth_small["manifest"], tmp_path / "idx", f"index.{knob}={value}"), quiet=True)
    assert not (tmp_path / "idx").exists()
    x = _unit(2000, 16)
    with pytest.raises(ConfigError, match=rf"^index.{knob}={value} must be {rule}"):
        if knob in ("nprobe", "ef_search"):
            store.set_search_params(store.build_faiss(x, "hnsw")[0], **{knob: value})
        else:
            store.build_faiss(x, "ivf_pq" if knob in ("pq_m", "refine") else "hnsw" if knob == "hnsw_m"
                              else "ivf_flat", **{knob: value})


def test_a_pq_m_that_does_not_divide_the_model_dim_fails_before_ray_and_embedding(synth_small, tmp_path, monkeypatch):
    """index.pq_m must divide the embedding dim; build_faiss said so only after every clip was
    embedded. The export's config holds the dim, so the check runs before Ray starts."""
    import clipray.runtime
    from clipray.export import save_export
    from clipray.models import create_model
    from serve import store
    from serve.index import build_index

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    model = create_model("test_meanP")
    export = save_export(model, tmp_path / "export")
    with pytest.raises(ConfigError, match=rf"^index.pq_m=5 must divide the embedding dim {model.embed_dim}"):
        build_index(_cfg(str(export), synth_small["manifest"], tmp_path / "idx", "index.kind=ivf_pq",
                         "index.pq_m=5"), quiet=True)
    assert not (tmp_path / "idx").exists()
    with pytest.raises(ConfigError, match=r"^index.pq_m=5 must divide the embedding dim 16"):
        store.build_faiss(_unit(10_000, 16), "ivf_pq", pq_m=5)


def test_an_export_whose_weights_are_cut_off_or_of_another_model_fails_before_ray(synth_small, tmp_path,
                                                                                  monkeypatch):
    """A model.safetensors cut off in a copy, or another head's weights under this config.json,
    passed the config check and failed in the embedding actor: Ray started, and the command
    ended in a 230-line ActorDiedError traceback. The weights' header is checked first."""
    import clipray.runtime
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.index import build_index

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    export = save_export(create_model("test_meanP"), tmp_path / "export")
    tight = save_export(create_model("test_tightTransf"), tmp_path / "tight")
    weights, good = export / "model.safetensors", (export / "model.safetensors").read_bytes()
    for target, extra in ((weights, []), (tight / "model.safetensors", [f"index.rerank_checkpoint={tight}"])):
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        with pytest.raises(ConfigError, match=rf"^{target}: not a readable safetensors file \(.+\): "
                                              r"export the model again"):
            build_index(_cfg(str(export), synth_small["manifest"], tmp_path / "idx", *extra), quiet=True)
        target.write_bytes(data)
    save_export(create_model("test_seqTransf"), tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=rf"^{weights} does not hold the model its config.json describes "
                                          r"\(meanP head\): unexpected head.blocks.0.attn.in_proj_bias"):
        build_index(_cfg(str(export), synth_small["manifest"], tmp_path / "idx"), quiet=True)
    weights.write_bytes(good)
    assert not (tmp_path / "idx").exists()
    from clipray.export import check_export

    assert check_export(export)["overrides"]["head"] == "meanP"  # reads the header only



def test_a_split_the_manifest_lacks_fails_before_ray_saying_so(synth_small, tmp_path, monkeypatch):
    """index.split=test on a manifest with no test row started Ray, embedded nothing and said
    "no clip could be embedded (see skip_report.jsonl)", a report that was never written."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import clipray.runtime
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.index import build_index

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    table = pq.read_table(synth_small["manifest"])
    manifest = tmp_path / "train_only.parquet"
    pq.write_table(table.filter(pc.equal(table["split"], "train")), manifest)
    export = save_export(create_model("test_meanP"), tmp_path / "export")
    with pytest.raises(ConfigError, match=rf"^manifest={manifest} has no clip to index in the test split "
                                          r"\(index.split\)$"):
        build_index(_cfg(str(export), str(manifest), tmp_path / "idx", "index.split=test"), quiet=True)
    assert not (tmp_path / "idx").exists()


def test_rerank_parts_of_appends_with_another_frame_count_are_padded_and_masked(tmp_path):
    """An append with another video.max_frames stores re-ranker features of another length: the
    Reranker failed to start with numpy's 'could not broadcast' from read_rerank. Shorter parts
    are now padded with masked frames, which the cross-encoder ignores."""
    from serve import store

    rng = np.random.default_rng(0)
    f0, m0 = rng.standard_normal((2, 3, 4)).astype(np.float16), np.array([[1, 1, 0], [1, 1, 1]], np.uint8)
    f1, m1 = rng.standard_normal((2, 5, 4)).astype(np.float16), np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], np.uint8)
    store.write_part(tmp_path, {"row_id": np.arange(2), "feats": f0, "mask": m0}, sub=store.RERANK_DIR)
    store.write_part(tmp_path, {"row_id": np.arange(2, 4), "feats": f1, "mask": m1}, sub=store.RERANK_DIR)
    feats, mask = store.read_rerank(tmp_path, 4)
    want_f = np.zeros((4, 5, 4), np.float16)
    want_f[:2, :3], want_f[2:] = f0, f1
    want_m = np.zeros((4, 5), np.uint8)
    want_m[:2, :3], want_m[2:] = m0, m1
    np.testing.assert_array_equal(feats, want_f)
    np.testing.assert_array_equal(mask, want_m)
    # a later part of 3 frames replacing rows 2-3 (an interrupted run's) masks their frames 4-5
    store.write_part(tmp_path, {"row_id": np.arange(2, 4), "feats": f0, "mask": m0}, sub=store.RERANK_DIR)
    feats, mask = store.read_rerank(tmp_path, 4)
    np.testing.assert_array_equal(mask, np.concatenate([want_m[:2], want_m[:2]]))
    np.testing.assert_array_equal(feats[2:, :3], f0)


def test_an_index_that_samples_unlike_the_exports_training_run_says_so(synth_small, tmp_path, monkeypatch, capsys):
    """The export records how training decoded clips and cut captions; an index at other
    settings (serve/configs/demo.yaml's 2 fps, 8 frames for a 1 fps, 12 frame recipe) was a
    silently worse index. It now names the differences and the overrides that match them."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import clipray.runtime
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.index import build_index

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    table = pq.read_table(synth_small["manifest"])
    manifest = tmp_path / "train_only.parquet"
    pq.write_table(table.filter(pc.equal(table["split"], "train")), manifest)
    trained = {"backend": "decord", "fps": 1.0, "max_frames": 12, "slice": "uniform", "size": 224, "timeout_s": 60.0}
    export = save_export(create_model("test_meanP"), tmp_path / "export",
                         extra={"video": trained, "max_words": 24})
    args = (str(export), str(manifest), tmp_path / "idx", "index.split=test")
    for overrides, said in (
        (["video.fps=2", "video.max_frames=8", "video.size=96", "serve.max_words=24"],
         "the export was trained with video.fps=1.0 video.max_frames=12, and this index uses "
         "video.fps=2.0 video.max_frames=8; give the former"),
        (["video.fps=1", "video.max_frames=12", "video.slice=head", "serve.max_words=32"],
         "the export was trained with video.slice=uniform serve.max_words=24, and this index uses "
         "video.slice=head serve.max_words=32; give the former"),
        # the same sampling (the backend and timeout are no sampling; the size is the model's)
        (["video.fps=1", "video.max_frames=12", "video.backend=pyav", "video.timeout_s=5", "serve.max_words=24"], None),
    ):
        with pytest.raises(ConfigError, match="has no clip to index"):
            build_index(_cfg(*args, *overrides), quiet=True)
        err = capsys.readouterr().err
        assert (said in err) if said else ("note" not in err), err
    # an export without the record (saved outside training): nothing to compare, nothing said
    bare = save_export(create_model("test_meanP"), tmp_path / "bare")
    with pytest.raises(ConfigError, match="has no clip to index"):
        build_index(_cfg(str(bare), str(manifest), tmp_path / "idx", "index.split=test", "video.fps=2"), quiet=True)
    assert "note" not in capsys.readouterr().err


def test_the_demo_indexes_with_the_sampling_its_model_trained_with(ray_local, s3_server, synth_small, tmp_path,
                                                                     monkeypatch, capfd):
    """`clipray demo data.video.max_frames=4 data.max_words=16` trained on 4 frames and 16-token
    captions, and its serving step indexed and queried with serve/configs/demo.yaml's 8 frames and
    32 tokens, printing a note to give overrides that the demo has no way to pass on."""
    import serve.__main__
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.demo_step import serve_demo, trained_sampling

    export = save_export(create_model("test_meanP"), tmp_path / "export", extra={
        "video": {"fps": 1.0, "max_frames": 4, "slice": "head", "size": 32}, "max_words": 16})

    class Started(Exception):
        pass

    def start(cfg):
        raise Started(cfg)

    monkeypatch.setattr(serve.__main__, "start", start)  # the index is what is checked: no app
    with pytest.raises(Started) as e:
        serve_demo(str(export), synth_small["manifest"], str(tmp_path / "run"))
    meta = json.loads((tmp_path / "run" / "index" / "index.json").read_text())
    assert {k: meta["video"][k] for k in ("fps", "max_frames", "slice")} == {"fps": 1.0, "max_frames": 4,
                                                                            "slice": "head"}
    assert meta["max_words"] == 16 and e.value.args[0].serve.max_words == 16  # the queries' tokens too
    assert "note:" not in capfd.readouterr().err
    if s3_server is not None:  # a demo run kept in object storage (train.storage_path=s3://...)
        s3 = s3_server.ensure_bucket()
        s3.fs().put(str(export), f"{s3.bucket}/demo/export", recursive=True)
        assert trained_sampling(s3.url("demo/export")) == trained_sampling(str(export)) == [
            "video.fps=1.0", "video.max_frames=4", "video.slice=head", "serve.max_words=16"]


def test_the_demos_random_ranking_average_is_said_exactly():
    """48 clips: a random ranking averages (48 + 1) / 2 = 24.5, which the demo printed as 24."""
    from serve.demo_step import ranks_line

    report = [{"rank": 1}, {"rank": 7}, {"rank": None}]
    assert ranks_line(report, 48, 20) == ("1/3 queries found their video in the top 5 of 48 clips (ranks 1, 7, >20; "
                                          "a random ranking would average 24.5)")
    assert ranks_line(report, 49, 20).endswith("a random ranking would average 25)")


def test_the_demo_ranks_the_true_video_as_evaluation_does():
    """The demo printed the true video's place in the results list: 'b', tied with 'c' listed
    after it (equal scores go by clip id), was rank 2 where evaluation, counting a tie against
    the query, says 3. By hand: 1 + the other clips scoring at least its 0.5."""
    from serve.demo_step import true_rank

    results = [{"video_id": v, "score": s} for v, s in (("a", 0.9), ("b", 0.5), ("c", 0.5), ("d", 0.2))]
    assert [true_rank(results, v) for v in ("a", "b", "c", "d", "e")] == [1, 3, 3, 4, None]


def test_an_export_in_object_storage_that_cannot_be_reached_is_an_error_line(synth_small, tmp_path):
    """checkpoint=s3://... without credentials (or network, or permission) ended `clipray index`
    in a botocore traceback from the export's fetch; the index folder made for it stayed behind."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    out = subprocess.run([sys.executable, "-m", "clipray.cli", "index", "serve/configs/demo.yaml",
                          "checkpoint=s3://clipray-none/export", f"manifest={synth_small['manifest']}",
                          f"out={tmp_path / 'index'}"], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "clipray index: error: checkpoint=s3://clipray-none/export: cannot fetch the export "
        "(NoCredentialsError: Unable to locate credentials)"], out.stderr
    assert not (tmp_path / "index").exists()

    # clipray serve of an index with its export at such a URI: the same line, not the traceback
    import torch

    from clipray.export import save_export
    from clipray.models import create_model
    from serve import store

    torch.manual_seed(0)
    export = str(save_export(create_model("test_meanP"), tmp_path / "export"))
    (tmp_path / "served").mkdir()
    store.write_meta(tmp_path / "served", {"format": "clipray.index/1", "export": export, "dim": 64, "count": 1,
                                           "fingerprint": store.fingerprint(export), "kind": "flat",
                                           "video": {"fps": 2.0, "max_frames": 8}})
    out = subprocess.run([sys.executable, "-m", "clipray.cli", "serve", "serve/configs/demo.yaml",
                          "checkpoint=s3://clipray-none/export", f"out={tmp_path / 'served'}"],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines()[-1:] == [
        "clipray serve: error: checkpoint=s3://clipray-none/export: cannot fetch the export "
        "(NoCredentialsError: Unable to locate credentials)"], out.stderr[-3000:]


def test_serving_cuts_queries_unlike_the_exports_training_run_says_so(tmp_path, capsys):
    """The app decodes query clips as the index recorded, but cuts queries at this config's
    serve.max_words: a run trained on 64-token captions (the ActivityNet and DiDeMo recipes) was
    served cutting every query at the default 32, with no word at `clipray serve` (only
    `clipray index` named it, where the caption length changes nothing that is served)."""
    import torch

    from clipray.export import save_export
    from clipray.models import create_model
    from serve import store
    from serve.app import app_from_config
    from serve.config import load_app_config

    torch.manual_seed(0)
    loose = str(save_export(create_model("test_meanP"), tmp_path / "loose", extra={"max_words": 64}))
    tight = str(save_export(create_model("test_tightTransf"), tmp_path / "tight", extra={"max_words": 48}))
    bare = str(save_export(create_model("test_meanP"), tmp_path / "bare"))  # saved outside training
    for export, rerank, words, said in (
        (loose, None, 32, "the export was trained with serve.max_words=64, and this app cuts queries at "
                          "serve.max_words=32; give the former"),
        (loose, tight, 64, "the re-ranker export was trained with serve.max_words=48, and this app cuts "
                           "queries at serve.max_words=64"),
        (loose, None, 64, None),
        (bare, None, 32, None),
        # a run given data.max_words=100 trains on the text tower's 77 positions and records 77;
        # served with 100, queries are cut at 77 as well (it was named as a difference)
        (str(save_export(create_model("test_meanP"), tmp_path / "full", extra={"max_words": 77})), None, 100, None),
    ):
        idx = tmp_path / f"idx-{Path(export).name}-{bool(rerank)}-{words}"
        idx.mkdir()
        store.write_meta(idx, {"format": "clipray.index/1", "export": export, "fingerprint": store.fingerprint(export),
                               "dim": 64, "count": 1, "kind": "flat", "video": {"fps": 2.0, "max_frames": 8},
                               "rerank": rerank and {"export": rerank, "fingerprint": store.fingerprint(rerank)}})
        app_from_config(load_app_config(None, [f"out={idx}", f"serve.max_words={words}"]))
        err = capsys.readouterr().err
        assert (said in err) if said else ("note" not in err), err
    from serve.index import sampling_notice  # and `clipray index`'s note likewise
    conf = {"context_length": 77, "extra": {"max_words": 77}}
    assert sampling_notice(conf, load_app_config(None, ["serve.max_words=100"])) == ""
    assert "this index uses serve.max_words=76" in sampling_notice(conf, load_app_config(None, ["serve.max_words=76"]))


def test_a_reranker_whose_training_sampled_otherwise_is_named_too(synth_small, tmp_path, monkeypatch, capsys):
    """The re-ranker's frame features are decoded with the index's sampling as well; only the
    loose export's training run was compared, so a tightTransf trained on 12 frames at 1 fps
    re-scored features of 8 frames at 2 fps without a word."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import clipray.runtime
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.index import build_index

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    table = pq.read_table(synth_small["manifest"])
    manifest = tmp_path / "train_only.parquet"
    pq.write_table(table.filter(pc.equal(table["split"], "train")), manifest)
    loose = save_export(create_model("test_meanP"), tmp_path / "loose",
                        extra={"video": {"fps": 2.0, "max_frames": 8, "slice": "uniform"}, "max_words": 32})
    tight = save_export(create_model("test_tightTransf"), tmp_path / "tight",
                        extra={"video": {"fps": 1.0, "max_frames": 12, "slice": "uniform"}, "max_words": 32})
    with pytest.raises(ConfigError, match="has no clip to index"):
        build_index(_cfg(str(loose), str(manifest), tmp_path / "idx", "index.split=test", "video.fps=2",
                         "video.max_frames=8", f"index.rerank_checkpoint={tight}"), quiet=True)
    err = capsys.readouterr().err
    assert ("the re-ranker export was trained with video.fps=1.0 video.max_frames=12, and this index uses "
            "video.fps=2.0 video.max_frames=8" in err), err
    assert "the export was" not in err, err


def test_more_frames_than_a_temporal_heads_positions_fail_before_ray(synth_small, tmp_path, monkeypatch):
    """seqTransf has one position per frame and tightTransf one more, for the caption (CLIP's 77
    text positions); training refuses more frames at start-up, but `clipray index
    video.max_frames=80` with such an export failed in every embedding actor, a Ray Data
    traceback after Ray and the actor pool had started."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import clipray.runtime
    from clipray.export import save_export
    from clipray.models import create_model
    from serve.index import build_index

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    table = pq.read_table(synth_small["manifest"])
    manifest = tmp_path / "train_only.parquet"  # no test clip: a run the checks pass stops there
    pq.write_table(table.filter(pc.equal(table["split"], "train")), manifest)
    seq = save_export(create_model("test_seqTransf"), tmp_path / "seq")
    tight = save_export(create_model("test_tightTransf"), tmp_path / "tight")
    assert create_model("test_seqTransf").context_length == 77
    for frames, rerank, said in (
        (78, None, rf"^video.max_frames=78: checkpoint={seq}: the seqTransf head has 77 positions, so at most 77"),
        (77, tight, rf"^video.max_frames=77: index.rerank_checkpoint={tight}: the tightTransf head has 77 "
                    r"positions \(one for the caption\), so at most 76 frames"),
        (77, None, "has no clip to index"),
        (76, tight, "has no clip to index"),
    ):
        out = tmp_path / f"idx-{frames}-{bool(rerank)}"
        with pytest.raises(ConfigError, match=said):
            build_index(_cfg(str(seq), str(manifest), out, "index.split=test", f"video.max_frames={frames}",
                             *([f"index.rerank_checkpoint={rerank}"] if rerank else [])), quiet=True)
        assert not out.exists()


def test_rerank_features_are_read_into_place_not_loaded_whole_beside_them(tmp_path):
    """read_rerank loaded every part whole and then copied it into the served array: a Reranker
    replica peaked at twice its features (24 GB for 1M clips of 12 frames at D 512, where it
    keeps 12 GB). Now a part is read a few thousand rows at a time: the peak is the array it
    keeps, and a block; the rows come out as before (brute force: the arrays written)."""
    from clipray.runtime import proc_status_kb, reset_peak_rss
    from serve import store

    if proc_status_kb("VmHWM") is None or not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read the peak resident set")
    rng = np.random.default_rng(0)
    n, t, d = 24_000, 12, 64  # 35 MB of fp16 features in one part (a first build)
    feats = rng.standard_normal((n, t, d), dtype=np.float32).astype(np.float16)
    mask = rng.integers(0, 2, (n, t)).astype(np.uint8)
    store.write_part(tmp_path, {"row_id": np.arange(n), "feats": feats, "mask": mask}, sub=store.RERANK_DIR)
    want = feats.copy()
    want[-5:] = 0  # an interrupted append's rows past the index (count n - 5) are left out
    del feats
    reset_peak_rss()
    before = proc_status_kb("VmRSS")
    got, got_mask = store.read_rerank(tmp_path, n - 5)
    peak = (proc_status_kb("VmHWM") - before) * 1024
    np.testing.assert_array_equal(got, want[:-5])
    np.testing.assert_array_equal(got_mask, mask[:-5])
    assert peak < 2 * got.nbytes, f"peak {peak / 1e6:.0f} MB for {got.nbytes / 1e6:.0f} MB of features"


def test_the_rebuild_reads_the_stored_vectors_in_place_not_three_copies_of_them(tmp_path):
    """The faiss rebuild read every embedding part whole (Parquet's reader held about three
    times a part's vectors), sorted the table by row id and joined its chunks: 2.4 GB to read
    back an index of 400k vectors of D 512 (0.8 GB), before faiss made its own copies. Now the
    parts are streamed into the one array by row id; the vectors are the ones written."""
    from clipray.runtime import proc_status_kb, reset_peak_rss
    from serve import store

    if proc_status_kb("VmHWM") is None or not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read the peak resident set")
    rng = np.random.default_rng(0)
    n, d = 40_000, 256  # two parts (a build and an append): 41 MB of vectors
    want = rng.standard_normal((n, d), dtype=np.float32)
    for ids in (np.arange(n // 2), np.arange(n // 2, n)):
        store.write_part(tmp_path, {"row_id": ids, "video_id": np.array([f"v{i}" for i in ids], object),
                                    "start": np.zeros(len(ids)), "end": np.ones(len(ids)),
                                    "path": np.array([f"/v/{i}.mp4" for i in ids], object),
                                    "embedding": want[ids]})
    reset_peak_rss()
    before = proc_status_kb("VmRSS")
    x = store.read_embeddings(tmp_path)
    peak = (proc_status_kb("VmHWM") - before) * 1024
    np.testing.assert_array_equal(x, want)
    assert peak < 2.5 * want.nbytes, f"peak {peak / 1e6:.0f} MB for {want.nbytes / 1e6:.0f} MB of vectors"


def test_a_searcher_keeps_the_clip_table_as_arrow_not_an_object_per_clip(tmp_path):
    """Every Searcher replica turned the index's clip columns (video id, start, end, path) into
    Python lists, an object per value: about three times their Arrow size (0.7 GB more for 3M
    clips, in each replica) and seconds of start-up. They stay Arrow columns now, read per
    result; a search's rows and /clips' paths are those written."""
    import tracemalloc

    from serve import store
    from serve.deployments import Searcher

    n = 50_000
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8), dtype=np.float32)
    ids = np.arange(n)
    starts = [None if i % 5 == 0 else float(i % 7) for i in ids]
    store.write_part(tmp_path, {"row_id": ids, "video_id": np.array([f"video{i // 3}" for i in ids], object),
                                "start": starts, "end": [None if s is None else s + 2.0 for s in starts],
                                "path": np.array([f"/data/videos/video{i // 3}.mp4" for i in ids], object),
                                "embedding": x})
    index, _ = store.build_faiss(x, "flat")
    store.save_faiss(tmp_path, index)
    store.write_meta(tmp_path, {"format": store.FORMAT, "count": n, "dim": 8, "kind": "flat", "search": {}})
    tracemalloc.start()
    try:
        s = Searcher.func_or_class(str(tmp_path), {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 4_000_000, f"{held / 1e6:.1f} MB of Python objects for {n} clips"
    scores, found = s.index.search(x[7:8], 3)  # what search_batch does (its batching needs Serve)
    assert found[0].tolist() == np.argsort(-(x @ x[7]), kind="stable")[:3].tolist()
    for i, score in zip(found[0], scores[0]):
        want = None if starts[i] is None else starts[i] + 2.0
        assert s._row(i, score) == {"clip_id": int(i), "video_id": f"video{i // 3}", "score": float(score),
                                    "start": starts[i], "end": want}
    assert s.clip_path(49_999) == "/data/videos/video16666.mp4" and s.clip_path(n) is None
    assert s.info()["clips"] == n


def test_an_index_written_on_a_full_disk_is_an_error_naming_the_file_and_keeps_the_old_one(tmp_path, file_size_limit):
    """`clipray index` on a full disk (here a file size limit, EFBIG): pyarrow's OSError for a
    part, Python's for index.json and faiss's RuntimeError for index.faiss named no file, so
    the command ended in a traceback, and each left its cut temporary file holding the space
    (a cut copy of a big faiss index: gigabytes of a full disk). Each is now an OSError naming
    the file, no temporary file stays, and the index's files before stay whole."""
    import faiss

    from serve import store

    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32))
    store.save_faiss(tmp_path, index)
    store.write_meta(tmp_path, {"format": store.FORMAT, "count": 8})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = file_size_limit(
        50_000, "for write in (lambda: store.write_part(out, rows), lambda: store.write_part(out, rows, 'rerank'),\n"
                "              lambda: store.save_faiss(out, big), lambda: store.write_meta(out, {'x': 'y' * 100_000})):\n"
                "    try:\n"
                "        write()\n"
                "    except OSError as e:\n"
                "        print(e.filename, e.errno)", tmp_path,
        setup="import faiss, numpy as np\nfrom serve import store\nout, n = sys.argv[1], 400\n"
              "rows = dict(row_id=np.arange(n), video_id=np.array(['v'] * n), start=np.zeros(n), end=np.ones(n),\n"
              "            path=np.array(['/v.mp4'] * n), embedding=np.random.rand(n, 64).astype(np.float32))\n"
              "big = faiss.IndexFlatIP(64)\nbig.add(rows['embedding'])\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"{tmp_path / 'embeddings' / 'part-00000.parquet'} 27",
                                       f"{tmp_path / 'rerank' / 'part-00000.npz'} 27",
                                       f"{tmp_path / store.FAISS} 27", f"{tmp_path / store.META} 27"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_index_skip_report_written_on_a_full_disk_is_an_error_naming_it(tmp_path, file_size_limit):
    """`clipray index` adds its skipped clips to skip_report.jsonl after every clip is
    embedded: a full disk (here a file size limit, EFBIG) was Python's OSError naming no file,
    and the command ended in its traceback. Appended in place, it also left a line cut, which
    the next run's first line joined: the report is now replaced whole, or left as it was."""
    before = '{"video_id": "old", "reason": "missing file"}\n' * 2
    (tmp_path / "skip_report.jsonl").write_text(before)
    res = file_size_limit(
        4096, "append_skips(Path(sys.argv[1]), [{'video_id': f'v{i}', 'reason': 'missing file'} for i in range(500)])",
        tmp_path, setup="from pathlib import Path\nfrom serve.index import append_skips\n")
    assert res.returncode == 0 and res.stdout.split() == [str(tmp_path / "skip_report.jsonl"), "27"], \
        (res.stdout, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skip_report.jsonl"]
    assert (tmp_path / "skip_report.jsonl").read_text() == before
    from serve.index import append_skips

    append_skips(tmp_path, [{"video_id": "new", "reason": "missing file"}])  # room again: added
    assert (tmp_path / "skip_report.jsonl").read_text() == before + '{"video_id": "new", "reason": "missing file"}\n'


def test_reading_an_index_gathers_no_string_column_into_one_array(tmp_path):
    """read_table sorted the parts by row id whatever their order, which gathers each column
    into one array: past 2 GiB of paths (tens of millions of clips) Arrow's 32-bit string
    offsets overflow, and `clipray serve` (every Searcher replica) and every append of such an
    index failed with 'offset overflow while concatenating arrays' (measured: 2.2M clips of
    1 kB paths). Parts written in row-id order are now read as they are, a chunk each; parts
    in another order are still sorted, their strings as large strings."""
    from serve import store

    def part(ids):
        n = len(ids)
        store.write_part(tmp_path, {"row_id": np.asarray(ids), "video_id": [f"v{i}" for i in ids],
                                    "start": [float(i) for i in ids], "end": [i + 1.0 for i in ids],
                                    "path": [f"/v/{i}.mp4" for i in ids], "embedding": _unit(n, 4)})

    for a in range(0, 9, 3):  # a build and two appends
        part(range(a, a + 3))
    t = store.read_table(tmp_path, store.META_COLUMNS)
    assert t.column("path").to_pylist() == [f"/v/{i}.mp4" for i in range(9)]
    assert t.column("start").to_pylist() == [float(i) for i in range(9)]
    assert {t.column(c).num_chunks for c in ("video_id", "path")} == {3}  # nothing gathered
    for p in store.parts(tmp_path):
        p.unlink()
    part(range(3, 6))  # parts out of row-id order (not clipray index's): sorted
    part(range(3))
    t = store.read_table(tmp_path, store.META_COLUMNS)
    assert t.column("row_id").to_pylist() == list(range(6))
    assert t.column("path").to_pylist() == [f"/v/{i}.mp4" for i in range(6)]
    assert t.column("video_id").to_pylist() == [f"v{i}" for i in range(6)]


def test_a_batched_search_answers_each_query_as_it_is_answered_alone(tmp_path):
    """The Searcher's batch searched every query at the batch's largest k and cut each to its
    own: an ivf_pq index re-scores refine x k candidates exactly, so a k=5 query batched with a
    k=50 one was re-scored among ten times the candidates it gets alone, and its answer hung on
    whoever else was searching at that moment. Each query's hits are now those it gets alone."""
    import faiss

    from serve import store
    from serve.deployments import Searcher

    n, d = 2000, 16
    x = _unit(n, d)
    ids = np.arange(n)
    store.write_part(tmp_path, {"row_id": ids, "video_id": [f"v{i}" for i in ids], "start": [0.0] * n,
                                "end": [1.0] * n, "path": [f"/v/{i}.mp4" for i in ids], "embedding": x})
    # an ivf_pq index as build_faiss makes one, with 4-bit codes so that it trains in a second
    index = faiss.index_factory(d, "IVF4,PQ4x4,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    store.save_faiss(tmp_path, index)
    store.write_meta(tmp_path, {"format": store.FORMAT, "count": n, "dim": d, "kind": "ivf_pq", "search": {"nprobe": 1, "refine": 2}})
    s = Searcher.func_or_class(str(tmp_path), {"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
    q = _unit(40, d, seed=1)
    alone = [s.search_many([(v, 5)])[0] for v in q]
    batched = s.search_many([(v, 5 if j % 2 else 50) for j, v in enumerate(q)])
    for j in range(1, len(q), 2):
        assert batched[j] == alone[j], j
    assert [s.search_many([(v, 50)])[0] for v in q[::2]] == batched[::2]

def test_an_ivf_pq_index_lists_tied_copies_by_clip_id_too(tmp_path):
    """An ivf_pq index re-scores refine x k candidates exactly, and its searches were not made
    deeper at a tie (a deeper search re-scores more candidates): of a video's copies tied at the
    k-th place faiss kept the highest clip id, every time (k=1 of 3 copies gave the last). A
    deeper search now re-scores the same refine x k candidates, so the tied copies among them
    are all returned and listed by clip id, as by the other kinds: by hand, the lowest copies."""
    import faiss

    from serve import store
    from serve.deployments import Searcher

    n, d = 2000, 16
    x = _unit(n, d)
    copies = [7, 1200, 1999]
    x[copies] = x[7]
    ids = np.arange(n)
    store.write_part(tmp_path, {"row_id": ids, "video_id": [f"v{i}" for i in ids], "start": [0.0] * n,
                                "end": [1.0] * n, "path": [f"/v/{i}.mp4" for i in ids], "embedding": x})
    index = faiss.index_factory(d, "IVF4,PQ4x4,RFlat", faiss.METRIC_INNER_PRODUCT)  # as build_faiss, 4-bit codes
    index.train(x)
    index.add(x)
    store.save_faiss(tmp_path, index)
    store.write_meta(tmp_path, {"format": store.FORMAT, "count": n, "dim": d, "kind": "ivf_pq",
                                "search": {"nprobe": 4, "refine": 4}})
    s = Searcher.func_or_class(str(tmp_path), {"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
    clips = lambda answer: [h["clip_id"] for h in answer]  # noqa: E731
    for k in (1, 2, 3):
        assert clips(s.search_many([(x[7], k)])[0]) == copies[:k], k
    assert [clips(a) for a in s.search_many([(x[7], 1), (x[1200], 2), (x[5], 3)])] == \
        [[7], [7, 1200], clips(s.search_many([(x[5], 3)])[0])]
    # the tie rule leaves each answer as it was where nothing ties: the re-scored top k
    q = _unit(20, d, seed=3)
    for v in q:
        found = s.index.search(v[None], 5)[1][0].tolist()  # refine 4: 20 candidates re-scored
        assert clips(s.search_many([(v, 5)])[0]) == found


def test_tied_clips_are_listed_by_clip_id_whatever_k_and_the_batch(tmp_path):
    """A duplicated video's copies score alike. faiss's flat index listed them higher id first
    and its k=1 search kept any one of them, so the first hit of the same query changed with k
    (k=2: clip 10, k=3: clip 34) and with the k of the queries batched with it. Equal scores
    are listed by clip id now, the lower first: each answer is the brute-force one."""
    from serve import store
    from serve.deployments import Searcher

    n, d = 1000, 8
    x = _unit(n, d)
    copies = np.sort(np.random.default_rng(2).choice(n, 100, replace=False))
    x[copies] = x[copies[-1]]
    ids = np.arange(n)
    store.write_part(tmp_path, {"row_id": ids, "video_id": [f"v{i}" for i in ids], "start": [0.0] * n,
                                "end": [1.0] * n, "path": [f"/v/{i}.mp4" for i in ids], "embedding": x})
    index, _ = store.build_faiss(x, "flat")
    store.save_faiss(tmp_path, index)
    store.write_meta(tmp_path, {"format": store.FORMAT, "count": n, "dim": d, "kind": "flat", "search": {}})
    s = Searcher.func_or_class(str(tmp_path), {"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
    q = x[copies[0]]
    scores = x.astype(np.float64) @ q
    ks = (1, 2, 3, 10, 105)
    for k in ks:
        want = np.lexsort((ids, -scores))[:k].tolist()
        assert [h["clip_id"] for h in s.search_many([(q, k)])[0]] == want, k
    # the same clips batched (their scores may differ in the last bit: faiss's batched product)
    clips = lambda answers: [[h["clip_id"] for h in a] for a in answers]  # noqa: E731
    alone = clips(s.search_many([(q, k)])[0] for k in ks)
    assert clips(s.search_many([(q, k) for k in ks])) == alone
    assert clips(s.search_many([(q, 1)] * 5 + [(q, 3)])) == [alone[0]] * 5 + [alone[2]]
    # ties below a better clip of a higher id: faiss kept any of the tied copies at the last
    # place (k=2 gave [99, 20] where a k=10 search began [99, 10, 20])
    n, d = 100, 64
    x = _unit(n, d, seed=1)
    x[[20, 30]] = x[10]
    ids = np.arange(n)
    out = tmp_path / "b"
    store.write_part(out, {"row_id": ids, "video_id": [f"v{i}" for i in ids], "start": [0.0] * n,
                           "end": [1.0] * n, "path": [f"/v/{i}.mp4" for i in ids], "embedding": x})
    store.save_faiss(out, store.build_faiss(x, "flat")[0])
    store.write_meta(out, {"format": store.FORMAT, "count": n, "dim": d, "kind": "flat", "search": {}})
    s = Searcher.func_or_class(str(out), {"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
    q = 0.8 * x[99] + 0.6 * x[10]
    scores = x.astype(np.float64) @ q
    assert np.lexsort((ids, -scores))[:4].tolist() == [99, 10, 20, 30]
    for k in (1, 2, 3, 4, 10, n):
        want = np.lexsort((ids, -scores))[:k].tolist()
        got = clips(s.search_many([(q, k), (q, 1), (x[5], k)]))
        assert got[0] == want and got[1] == want[:1], k
        assert clips(s.search_many([(q, k)])) == [want] and got[2] == clips(s.search_many([(x[5], k)]))[0]


def test_copies_of_a_clip_keep_their_order_in_a_batch_of_four_or_more(tmp_path):
    """From 4 queries on, a flat index scores the batch with one BLAS product, whose rounding
    hangs on a clip's place in the index: a copy of clip a at row 113 scored 1 ulp above it, and
    k=1 batched with 3 other queries gave 113 where alone it gave a (35 of 60 places here). The
    hits are scored again one at a time: the brute-force answer, batched or not."""
    from serve import store
    from serve.deployments import Searcher

    n, d = 118, 64
    x0 = _unit(n, d)
    ids = np.arange(n)
    for a in range(0, 60, 3):
        x = x0.copy()
        x[113] = x[a]
        out = tmp_path / str(a)
        store.write_part(out, {"row_id": ids, "video_id": [f"v{i}" for i in ids], "start": [None] * n,
                               "end": [None] * n, "path": [f"/v/{i}.mp4" for i in ids], "embedding": x})
        store.save_faiss(out, store.build_faiss(x, "flat")[0])
        store.write_meta(out, {"format": store.FORMAT, "count": n, "dim": d, "kind": "flat", "search": {}})
        s = Searcher.func_or_class(str(out), {"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
        for k in (1, 2, 5):
            want = np.lexsort((ids, -(x.astype(np.float64) @ x[a])))[:k].tolist()
            assert want[:2] == [a, 113][:k]
            batch = s.search_many([(x[a], k), (x[1], k), (x[2], k), (x[3], k)])
            assert [h["clip_id"] for h in batch[0]] == want == [h["clip_id"] for h in s.search_many([(x[a], k)])[0]]
            if k > 1:  # the copies score alike
                assert batch[0][0]["score"] == batch[0][1]["score"]


def test_the_reranker_scores_copies_of_a_clip_alike():
    """The cross-encoder scored a batch of candidates at once, and two copies of one clip (a
    video indexed twice) came out ~1e-9 apart by their places in it (42 of 160 pools here), so
    the re-ranked list ordered them by that, not by clip id. Copies are scored once now; every
    score is the one its clip gets scored alone."""
    import open_clip
    import torch

    from clipray.models import create_model
    from serve.deployments import score_candidates

    torch.manual_seed(0)
    model = create_model("test_tightTransf").eval()
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=32)
    rng = np.random.default_rng(0)
    n = 30
    feats = torch.from_numpy(rng.standard_normal((n, 8, 64)).astype(np.float16))
    mask = torch.from_numpy(rng.random((n, 8)) < 0.8)
    mask[:, 0] = True
    feats[17], mask[17] = feats[3], mask[3]
    words = "a red blue green square circle moves left right up down then".split()
    for _ in range(40):
        text = " ".join(rng.choice(words, 6))
        for pool in ([3, 17], [17, 3], [3, 5, 17], list(range(n)), []):
            got = dict(zip(pool, score_candidates(model, tok, feats, mask, [(text, pool)])[0]))
            if pool:
                assert got[3] == got[17], (text, pool)
                alone = {c: score_candidates(model, tok, feats, mask, [(text, [c])])[0][0] for c in pool}
                np.testing.assert_allclose([got[c] for c in pool], [alone[c] for c in pool], rtol=1e-5, atol=1e-6)


def test_the_faiss_build_says_when_it_starts_and_how_long_it_took(tmp_path, capsys):
    """After the last clip is embedded, reading every vector back, training an IVF/PQ index
    and the recall check ran for minutes on millions of clips with no line at all: a start
    line, and one at the end with the count and the time."""
    from serve import store
    from serve.index import _rebuild

    rng = np.random.default_rng(0)
    ids = np.arange(300)
    store.write_part(tmp_path, {"row_id": ids, "video_id": np.array([f"v{i}" for i in ids], object),
                                "start": np.zeros(300), "end": np.ones(300),
                                "path": np.array([f"/v/{i}.mp4" for i in ids], object),
                                "embedding": rng.standard_normal((300, 16), dtype=np.float32)})
    cfg = _cfg("unused", "unused", tmp_path, "index.kind=ivf_flat", "index.nlist=4")
    meta = _rebuild(tmp_path, cfg, str(tmp_path), "fp", "", {"image_size": 32, "tokenizer_name": "t"},
                    [], None)
    assert meta["count"] == 300
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"index {tmp_path}: building the ivf_flat faiss index ..."
    assert lines[1].startswith(f"index {tmp_path}: ivf_flat faiss index of 300 clips built and saved in ")
    assert lines[1].endswith("s") and len(lines) == 2
    _rebuild(tmp_path, cfg, str(tmp_path), "fp", "", {"image_size": 32, "tokenizer_name": "t"}, [], None, quiet=True)
    assert capsys.readouterr().out == ""  # (clipray bench serve builds its indexes quietly)
