"""Retrieval metrics against a brute-force reference, and the block-wise evaluation helpers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch

import clipray.metrics as M
from clipray.metrics import METRIC_KEYS, embed_texts, embed_videos, retrieval_metrics, similarity_in_blocks
from clipray.models import create_model



def brute_force(sim, video_of_text):
    """The definition, literally: rank = 1 + number of OTHER candidates scoring >= the match;
    video-to-text takes the best rank among the video's own captions, and only captions of
    other videos compete (a video's own captions are all correct answers)."""
    sim = np.asarray(sim, dtype=np.float64)
    nt, nv = sim.shape
    t2v = []
    for i in range(nt):
        match = sim[i, video_of_text[i]]
        t2v.append(1 + sum(1 for j in range(nv) if j != video_of_text[i] and sim[i, j] >= match))
    v2t = []
    for j in range(nv):
        own = [c for c in range(nt) if video_of_text[c] == j]
        v2t.append(min(1 + sum(1 for t in range(nt) if video_of_text[t] != j and sim[t, j] >= sim[c, j])
                       for c in own))
    out = {}
    for prefix, ranks in (("t2v", np.array(t2v)), ("v2t", np.array(v2t))):
        out.update({
            f"{prefix}_r1": 100.0 * np.mean(ranks <= 1), f"{prefix}_r5": 100.0 * np.mean(ranks <= 5),
            f"{prefix}_r10": 100.0 * np.mean(ranks <= 10), f"{prefix}_mdr": float(np.median(ranks)),
            f"{prefix}_mnr": float(np.mean(ranks)),
        })
    return out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_brute_force_with_ties_and_several_captions(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    nv = int(rng.integers(3, 25))
    nt = nv + int(rng.integers(0, 3 * nv))
    video_of_text = np.concatenate([np.arange(nv), rng.integers(0, nv, nt - nv)])
    rng.shuffle(video_of_text)
    levels = int(rng.integers(2, 6))  # few distinct values: many ties
    sim = rng.integers(0, levels, (nt, nv)).astype(np.float32)
    if seed % 2:
        sim = sim + rng.normal(0, 1, (nt, nv)).astype(np.float32) * (rng.random((nt, nv)) < 0.5)
    want = brute_force(sim, video_of_text)
    got = retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(video_of_text))
    assert set(got) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k]), k
    # blocks of one or two rows (7 elements), then of 3 rows with a shorter last block: a block's
    # slice must take every one of its rows, in both directions
    for elems in (7, 3 * nv):
        monkeypatch.setattr(M, "_BLOCK_ELEMS", elems)
        assert retrieval_metrics(sim, video_of_text) == pytest.approx(want), elems


def test_ties_count_against_the_query_one_rank_each():
    sim = torch.ones(3, 3)  # the reference turns this into extra ranks and R@1 = 60%
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["t2v_r1"] == 0.0 and m["t2v_mdr"] == 3.0 and m["v2t_mnr"] == 3.0
    m = retrieval_metrics(torch.eye(3), [0, 1, 2])
    assert m["t2v_r1"] == m["v2t_r1"] == 100.0 and m["t2v_mnr"] == 1.0


def test_a_videos_own_tied_captions_do_not_count_against_it():
    # Video 0 has the same sentence twice (MSVD repeats captions verbatim): both copies score
    # 0.9, above every other text, so video 0 retrieves a correct caption first.
    sim = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    assert M.v2t_ranks(sim, [0, 0, 1]).tolist() == [1, 1]
    assert retrieval_metrics(sim, [0, 0, 1])["v2t_r1"] == 100.0
    # a caption of ANOTHER video tying with the best own caption still counts against it
    sim = torch.tensor([[0.9, 0.1], [0.5, 0.1], [0.9, 0.8]])
    assert M.v2t_ranks(sim, [0, 0, 1]).tolist() == [2, 1]


def test_bad_inputs_are_errors():
    sim = torch.rand(4, 3)
    sim[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.rand(2, 3), [0, 1])
    with pytest.raises(ValueError):
        retrieval_metrics(torch.rand(2, 3), [0, 3])


def test_fractional_video_indices_are_an_error_not_truncated():
    sim = torch.eye(2)
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(sim, np.array([0.9, 1.2]))  # was read as [0, 1]: R@1 = 100
    assert retrieval_metrics(sim, np.array([0.0, 1.0]))["t2v_r1"] == 100.0  # whole floats are fine


def test_an_empty_similarity_matrix_is_an_error_not_nan_metrics():
    for sim in (torch.zeros(0, 0), torch.zeros(0, 3)):
        with pytest.raises(ValueError, match="no text"):
            retrieval_metrics(sim, [])


def _data(n=6, t=3):
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (n, t, 3, 32, 32), dtype=torch.uint8, generator=g)
    mask = torch.arange(t)[None] < torch.tensor([3, 1, 2, 3, 2, 1][:n])[:, None]
    words = ["dog", "cat", "car", "tree", "boat", "bird", "rain", "sun"]
    tokens = open_clip.get_tokenizer("ViT-B-32")([f"a {w} in a video" for w in words[:n]], context_length=16)
    return frames, mask, tokens


def _batches(x, size):
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


@pytest.mark.parametrize("name", ["test_seqTransf", "test_tightTransf"])
def test_block_wise_scores_equal_one_shot_scores(name):
    torch.manual_seed(0)
    model = create_model(name)
    frames, mask, tokens = _data()
    text = embed_texts(model, _batches(tokens, 4))
    video, vmask = embed_videos(model, zip(_batches(frames, 4), _batches(mask, 4)))
    blocks = similarity_in_blocks(model, text, video, vmask, text_block=2, pair_block=3)
    with torch.no_grad():
        feats = model.encode_frames(model.normalize(frames), mask)
        direct = model.similarity(model.encode_text(tokens), feats, mask)
    assert blocks.shape == (6, 6) and blocks.dtype == torch.float32
    assert torch.allclose(blocks, direct, atol=1e-5)
    assert video.shape == ((6, 64) if model.indexable else (6, 3, 64))


def test_a_bf16_cross_encoder_scores_the_float32_embeddings_it_stored():
    # Evaluation keeps embeddings as float32 on CPU; a bf16 model (DeepSpeed bf16 on GPU) must
    # still score them, as if it had been handed its own bf16 features.
    torch.manual_seed(0)
    model = create_model("test_tightTransf").to(torch.bfloat16)
    frames, mask, tokens = _data(n=4)
    text = embed_texts(model, [tokens])
    video, vmask = embed_videos(model, [(frames, mask)])
    assert text.dtype == video.dtype == torch.float32
    got = similarity_in_blocks(model, text, video, vmask, pair_block=5)
    with torch.no_grad():
        want = model.similarity(text.bfloat16(), video.bfloat16(), vmask).float()
    assert torch.equal(got, want)


def test_a_bf16_model_embeds_float_frames_as_it_embeds_uint8_ones():
    """embed_videos takes "already normalised floats"; a bf16 model refused float32 ones
    (Input type FloatTensor and weight type BFloat16 should be the same)."""
    torch.manual_seed(0)
    model = create_model("test_meanP").to(torch.bfloat16)
    frames, mask, _ = _data(n=4)
    want, _ = embed_videos(model, [(frames, mask)])
    got, _ = embed_videos(model, [(model.normalize(frames).float(), mask)])
    assert torch.equal(got, want)


def test_all_equal_embeddings_score_r1_near_zero():
    torch.manual_seed(0)
    model = create_model("test_meanP")
    with torch.no_grad():  # every text and every video maps to the same vector
        model.backbone.clip.text_projection.zero_()
        model.backbone.clip.text_projection[0, 0] = 1.0
        model.backbone.clip.visual.proj.zero_()
        model.backbone.clip.visual.proj[0, 0] = 1.0
    frames, mask, tokens = _data(n=6)
    text = embed_texts(model, _batches(tokens, 4))
    video, _ = embed_videos(model, zip(_batches(frames, 4), _batches(mask, 4)))
    m = retrieval_metrics(similarity_in_blocks(model, text, video), list(range(6)))
    assert set(m) == set(METRIC_KEYS)
    assert m["t2v_r1"] == 0.0 and m["v2t_r1"] == 0.0 and m["t2v_mdr"] == 6.0


def test_dual_softmax_ranks_by_hand():
    # Text 1 scores video 0 above its own video 1, but text 0 claims video 0 more strongly
    # and text 1 is video 1's best text: the prior over texts moves text 1 to video 1.
    sim = torch.tensor([[0.9, 0.2], [0.85, 0.3]])
    assert retrieval_metrics(sim, [0, 1])["t2v_r1"] == 50.0
    assert M.retrieval_metrics_dsl(sim, [0, 1]) == {"dsl_t2v_r1": 100.0, "dsl_t2v_r5": 100.0, "dsl_t2v_r10": 100.0,
                                                    "dsl_t2v_mdr": 1.0, "dsl_t2v_mnr": 1.0, "dsl_v2t_r1": 100.0,
                                                    "dsl_v2t_r5": 100.0, "dsl_v2t_r10": 100.0, "dsl_v2t_mdr": 1.0,
                                                    "dsl_v2t_mnr": 1.0}
    assert torch.allclose(M.dual_softmax(sim).double(), (sim * torch.softmax(sim * 100.0, dim=0)).double())
    # cosine gaps above ~0.87 underflowed float32's softmax to 0: the zeroed pairs tied, and the
    # ties counted against the query (v2t MnR 3.0); exact: video 0 ranks 1, 2 and 3 -> MnR 8/3
    far = torch.tensor([[-0.13, 0.2, 0.14], [0.84, 0.24, -0.19], [0.9, 0.51, -0.15]])
    assert M.retrieval_metrics_dsl(far, [0, 1, 2])["dsl_v2t_mnr"] == pytest.approx(8 / 3)


def test_dual_softmax_video_to_text_takes_the_prior_over_videos_per_text():
    """DSL video-to-text re-weights each text's row by softmax over videos (dim=1, the
    `dual_softmax` docstring). By hand: text 0 scores video 1 (0.85) above text 1 does (0.3), so
    plainly video 1 ranks its caption 2nd (v2t R@1 50); per text, 0.85 is text 0's second
    choice (weight 1 / (1 + e^5)) and 0.3 text 1's first (e^10 / (1 + e^10)): 0.0057 < 0.29999,
    video 1 ranks its caption 1st. The prior over texts (dim=0) would keep it 2nd."""
    sim = torch.tensor([[0.9, 0.85], [0.2, 0.3]])
    assert retrieval_metrics(sim, [0, 1])["v2t_r1"] == 50.0
    got = M.retrieval_metrics_dsl(sim, [0, 1])
    assert (got["dsl_v2t_r1"], got["dsl_v2t_mnr"]) == (100.0, 1.0)


def test_a_multi_row_block_ranks_each_of_its_rows(monkeypatch):
    """Text-to-video ranks go over row blocks (`_BLOCK_ELEMS` // videos rows each, here 2): each
    block's slice must hold all its rows. By hand: texts 0-3 rank their own video 1st; text 4
    scores video 0 (1.0) above its own video 4 (0.5): rank 2. R@1 4/5, MnR 6/5."""
    sim = torch.eye(5)
    sim[4, 0], sim[4, 4] = 1.0, 0.5
    want = M.retrieval_metrics(sim, list(range(5)))
    assert (want["t2v_r1"], want["t2v_mnr"]) == (80.0, 1.2)
    monkeypatch.setattr(M, "_BLOCK_ELEMS", 10)
    assert M.t2v_ranks(sim, list(range(5))).tolist() == [1, 1, 1, 1, 2]
    assert M.retrieval_metrics(sim, list(range(5))) == want


def test_loose_scores_in_text_blocks_fill_every_row():
    """similarity_in_blocks fills [Nt, Nv] in row blocks of `text_block` texts: 5 texts in
    blocks of 2 leave a last block of one, which must be filled too: equal to t @ v.T."""
    torch.manual_seed(0)
    model = create_model("test_meanP")
    t = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    assert torch.allclose(similarity_in_blocks(model, t, v, text_block=2), t @ v.t(), atol=1e-6)


def test_dual_softmax_is_refused_for_a_cross_encoder_before_ray_starts():
    """tightTransf scores are logits of either sign: sim x softmax(100 sim) ranked a perfect
    [[-1, -3], [-3, -1]] at R@1 0 (the larger weight made the match's negative score more
    negative), and gaps past ~7 logits underflowed the weights to 0, even in float64."""
    from clipray.config import ConfigError, load_config
    from train.driver import model_io

    assert M.retrieval_metrics_dsl(torch.tensor([[-1.0, -3.0], [-3.0, -1.0]]), [0, 1])["dsl_t2v_r1"] == 0.0
    with pytest.raises(ConfigError, match=r"^train.eval_dsl: dual softmax re-weights cosine similarities, and the "
                                          r"tightTransf head scores pairs with unbounded logits"):
        model_io(load_config(None, ["model.name=test_tightTransf", "train.eval_dsl=true"]))
    with pytest.raises(ConfigError, match=r"^train.eval_dsl: .* the tightTransf head"):  # a head override too
        model_io(load_config(None, ["model.head=tightTransf", "train.eval_dsl=true"]))
    assert model_io(load_config(None, ["model.name=test_seqTransf", "train.eval_dsl=true"])).train.eval_dsl
    assert not model_io(load_config(None, ["model.name=test_tightTransf"])).train.eval_dsl


def test_loose_scores_stay_float32_under_the_training_loops_bf16_autocast():
    """On GPU the loop evaluates under bf16 autocast, which ran the text x video products in
    bf16: scores of ~3 digits, so a match 0.0002 above its nearest rival tied with it (a miss,
    ties count against the query) and R@1 came out about a point lower than the float32
    ranking the served index gives the same vectors. The CPU autocast does the same casts."""
    model = create_model("test_meanP")
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    video = torch.tensor([[0.3002, 0.953877, 0.0], [0.3, 0.0, 0.953939]])  # unit rows
    want = text @ video.t()
    assert want[0, 0] - want[0, 1] == pytest.approx(0.0002, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = similarity_in_blocks(model, text, video)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert retrieval_metrics(got, [0, 1])["t2v_r1"] == 100.0
    assert retrieval_metrics(want.bfloat16().float(), [0, 1])["t2v_r1"] == 50.0  # what bf16 scores gave


@pytest.mark.parametrize("whole", [None, float("nan")])
def test_evaluation_groups_a_videos_captions_whose_times_are_nan_as_one_clip(ray_local, tmp_path, whole):
    """A Parquet manifest may mark a whole-video row with NaN start/end (pyarrow keeps a NaN it
    is given; pandas writes a null): the manifest and the decoder read both as the whole file.
    Evaluation keyed clips by (video_id, start, end), where no NaN equals another, so each of a
    video's captions became a clip of its own and the video's copies outranked each other:
    3 videos of 2 captions were 6 targets, R@1 0. Brute force: 3 clips, ranks by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.evaluate import evaluate

    n = 6
    vid = [0, 0, 1, 1, 2, 2]
    words = ["dog", "cat", "car", "tree", "boat", "bird"]
    # a 7th row, of video 2, whose caption the tokenizer cleans to no words: not a query (it was
    # ranked as the empty text), and no clip is decoded from it (the decoder skips it)
    pq.write_table(pa.table({
        "row_id": pa.array(range(n + 1), pa.int64()), "video_id": [f"v{v}" for v in vid + [2]],
        "path": [f"v{v}.mp4" for v in vid + [2]],
        "start": pa.array([whole] * (n + 1), pa.float64(), from_pandas=False),
        "end": pa.array([whole] * (n + 1), pa.float64(), from_pandas=False),
        "caption": [f"a {w}" for w in words] + ["&nbsp;"], "split": ["test"] * (n + 1)}), tmp_path / "m.parquet")
    torch.manual_seed(0)
    model = create_model("test_meanP")
    frames = _data(n=3, t=2)[0]
    mask = torch.ones(n, 2, dtype=torch.bool)
    tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    tokens = tokenize([f"a {w}" for w in words])
    shard = ray_local.data.from_items([{"frames": frames[v, :2].numpy(), "frame_mask": mask[i].numpy(),
                                        "tokens": tokens[i].numpy(), "row_id": i} for i, v in enumerate(vid)])
    seen = []  # each caption is tokenized once: it was twice, as a query and to see if it has words

    def counted(texts):
        seen.extend(t for t in texts if t)  # less wordless's own tokenize([""])
        return tokenize(texts)

    got = evaluate(model, shard, str(tmp_path / "m.parquet"), "test", 4, counted)
    assert sorted(seen) == sorted([f"a {w}" for w in words] + ["&nbsp;"])
    with torch.no_grad():
        video = model.encode_video(model.normalize(frames[:, :2]), torch.ones(3, 2, dtype=torch.bool))
        sim = model.encode_text(tokens) @ video.t()
    want = brute_force(sim.numpy(), vid)
    assert got["num_test_videos"] == 3 and got["num_test_texts"] == 6
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k]), k
    if whole is not None:
        return
    # a NaN embedding failed the run on the metrics' 'similarity matrix contains NaN', which
    # named no clip: now the clip (NaN frames, as a decoder could give) or the caption is named
    floats = model.normalize(frames[:, :2])  # normalised floats are embedded as they come
    floats[1] = float("nan")
    nan_frames = ray_local.data.from_items([{"frames": floats[v].numpy(), "frame_mask": mask[i].numpy(),
                                             "tokens": tokens[i].numpy(), "row_id": i} for i, v in enumerate(vid)])
    with pytest.raises(RuntimeError, match=r"'test' split: the model's embedding of 1 of 3 clips is not finite "
                                           r"\(NaN/inf\), the first clip 'v1'$"):
        evaluate(model, nan_frames, str(tmp_path / "m.parquet"), "test", 4, tokenize)
    with torch.no_grad():
        model.backbone.clip.token_embedding.weight[tokens[4, 2]] = float("nan")  # 'boat': one caption
    with pytest.raises(RuntimeError, match=r"embedding of 1 of 6 captions is not finite \(NaN/inf\), the first "
                                           r"caption 'a boat' \(clip 'v2'\)$"):
        evaluate(model, shard, str(tmp_path / "m.parquet"), "test", 4, tokenize)


def test_evaluation_decodes_each_clip_from_a_row_whose_caption_has_words(tmp_path):
    """Evaluation decodes each test clip once, from its first row, and the decoder skips a row
    whose caption the tokenizer cleans to no words (`&nbsp;`, control characters): a clip whose
    first caption was such lost its other captions too and left the evaluation, one clip fewer
    without a word. Its first row with words is decoded now; a clip with none stays out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.evaluate import first_rows

    vid = [0, 0, 1, 1, 2, 3, 3]
    captions = ["&nbsp;", "a dog", "a cat", "\x00 \x07", "&nbsp;", "a car", "a boat"]
    n = len(vid)
    pq.write_table(pa.table({
        "row_id": pa.array(range(n), pa.int64()), "video_id": [f"v{v}" for v in vid],
        "path": [f"v{v}.mp4" for v in vid], "start": pa.array([None] * n, pa.float64()),
        "end": pa.array([None] * n, pa.float64()), "caption": captions, "split": ["test"] * n}),
        tmp_path / "m.parquet")
    tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    assert first_rows(str(tmp_path / "m.parquet"), "test", tokenize) == [1, 2, 5]


def test_evaluation_adds_the_dual_softmax_ranks_only_with_train_eval_dsl(tmp_path, monkeypatch):
    """train.eval_dsl: training's evaluation reports `retrieval_metrics_dsl` of the similarity
    matrix it ranked, apart (dsl_*), beside unchanged plain ranks; off, no dsl_ key. The shard
    is a stand-in for the worker's Ray Data share (no Ray: one worker)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import train.evaluate as E

    vid = [0, 0, 1, 2, 3, 3]
    words = ["dog", "cat", "car", "tree", "boat", "bird"]
    n = len(vid)
    pq.write_table(pa.table({
        "row_id": pa.array(range(n), pa.int64()), "video_id": [f"v{v}" for v in vid],
        "path": [f"v{v}.mp4" for v in vid], "start": pa.array([None] * n, pa.float64()),
        "end": pa.array([None] * n, pa.float64()), "caption": [f"a {w}" for w in words], "split": ["test"] * n}),
        tmp_path / "m.parquet")
    frames, mask, _ = _data(n=4, t=2)
    rows = [{"frames": frames[v], "frame_mask": mask[v], "row_id": torch.tensor(i)} for i, v in enumerate(vid)]

    class Shard:
        def iter_torch_batches(self, batch_size, drop_last):
            for i in range(0, len(rows), batch_size):
                yield {k: torch.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}

    sims = []

    def kept(*args, **kwargs):
        sims.append(similarity_in_blocks(*args, **kwargs))
        return sims[-1]

    monkeypatch.setattr(E, "similarity_in_blocks", kept)
    torch.manual_seed(0)
    model = create_model("test_meanP")
    tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    off = E.evaluate(model, Shard(), str(tmp_path / "m.parquet"), "test", 4, tokenize)
    on = E.evaluate(model, Shard(), str(tmp_path / "m.parquet"), "test", 4, tokenize, dsl=True)
    assert torch.equal(sims[0], sims[1]) and sims[0].shape == (6, 4)
    assert not [k for k in off if k.startswith("dsl_")]
    assert {k: v for k, v in on.items() if k.startswith("dsl_")} == M.retrieval_metrics_dsl(sims[1], vid)
    assert {k: v for k, v in on.items() if not k.startswith("dsl_")} == off == {
        **retrieval_metrics(sims[0], vid), "num_test_videos": 4, "num_test_texts": 6}
