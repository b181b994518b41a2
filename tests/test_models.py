"""CLIP4Clip models on open_clip: semantics of every head, the 3d patch, tuning and loading.

Tiny registered variants only (32 px, random weights), except one build-only ViT-B/32 test.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import clipray
from clipray.config import ModelConfig
from clipray.losses import LOGIT_SCALE_MAX, clamp_logit_scale
from clipray.models import HEAD_NAMES, build_model, create_model
from clipray.models.backbone import TINY_OPEN_CLIP_NAME, ClipBackbone
from clipray.task import RetrievalTask

TINY = [f"test_{h}" for h in HEAD_NAMES]
ATOL = 2e-5


def tokens(texts, length=32):
    return open_clip.get_tokenizer("ViT-B-32")(texts, context_length=length)


def clip_batch(b=3, t=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, t, 3, size, size), dtype=torch.uint8, generator=g)
    lengths = torch.tensor([t, 2, 4, 1, 5, 3][:b])
    mask = torch.arange(t)[None] < lengths[:, None]
    return frames, mask


def build(name, **kw):
    torch.manual_seed(0)
    return create_model(name, **kw)


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_train(name):
    model = build(name)
    assert all(p.ndim > 0 for p in model.parameters())  # DeepSpeed 0.19.8 breaks on 0-dim
    assert model.logit_scale.shape == (1,)
    assert (model.image_size, model.context_length) == (32, 77)
    open_clip.get_tokenizer(model.tokenizer_name)  # loadable in any process
    task = RetrievalTask(model)
    frames, mask = clip_batch()
    out = task(frames, mask.int(), tokens(["a dog runs", "two cats", "a red car"]))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), name
    head_grads = [g for n, g in grads.items() if n.startswith("head.")]
    assert all(g.abs().sum() > 0 for g in head_grads)
    assert model.indexable == (name != "test_tightTransf")


def test_unipt_side_networks_alone_fit_a_batch_on_a_frozen_clip():
    """What the side networks can learn from a frozen (here random) CLIP's layer states:
    8 captions that differ only in colour, shape and direction, matched to 8 clips."""
    model = build("test_meanP", tuning="unipt")
    task = RetrievalTask(model).train()
    words = ["red square left", "blue circle up", "green triangle down", "yellow star right",
             "red circle up", "blue square down", "green star left", "yellow triangle up"]
    frames = torch.randint(0, 256, (8, 4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(8, 4, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = task(frames, mask, tokens(words))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(8) and losses[-1] < 0.1, losses[::10]


def test_unipt_side_networks_have_the_published_size_on_vitb32():
    model = create_model("clip4clip_vitb32_meanP", tuning="unipt")
    d, layers = 512, 12 + 1  # embedding width; 12 blocks' outputs + the first block's input

    def size(width):  # anchor and output Linear(d, d), one Linear(width, d) per layer, Linear(d, 1)
        return 2 * (d * d + d) + layers * (width * d + d) + d + 1

    got = {k: sum(p.numel() for p in getattr(model.tuning, k).parameters()) for k in ("vision", "text")}
    assert got == {"vision": size(768), "text": size(512)} == {"vision": 5_644_289, "text": 3_940_353}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5_644_289 + 3_940_353


def test_vitb32_builds_without_download():
    model = create_model("clip4clip_vitb32_seqTransf", pretrained=None)
    assert (model.image_size, model.embed_dim, model.tokenizer_name) == (224, 512, "ViT-B-32-quickgelu")
    clip = model.backbone.clip
    assert clip.visual.conv1.weight.shape == (768, 3, 32, 32)
    assert model.head.frame_position_embeddings.weight.shape == (77, 512)
    assert len(model.head.blocks) == 4 and model.head.blocks[0].attn.num_heads == 8
    assert isinstance(model.head.blocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert model.logit_scale.shape == (1,)


def test_a_model_asked_for_random_weights_is_built_without_open_clips_random_weights_line(caplog):
    """open_clip logs "No pretrained weights loaded for model ... initialized randomly" for every
    model built without weights: the demo's console had it from each training worker and the
    index's actors, of a tiny model asked to be random. It is dropped there, and only there."""
    import logging

    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        create_model("test_meanP")
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
        open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None)  # open_clip's own call still says it
        assert [r for r in caplog.records if r.getMessage().startswith("No pretrained weights loaded for model")]
    assert logging.getLogger().filters == filters


@pytest.mark.parametrize("linear_patch, tuning", [("2d", "full"), ("3d", "full"), ("2d", "unipt")])
@pytest.mark.parametrize("name", TINY)
def test_padding_changes_nothing(name, linear_patch, tuning):
    model = build(name, linear_patch=linear_patch, tuning=tuning).eval()
    if linear_patch == "3d":  # as if trained: outer time slices read the neighbouring frames
        with torch.no_grad():
            model.backbone.patch3d.weight.normal_(std=0.05)
    frames, mask = clip_batch(b=3, t=6)
    noisy = frames.clone()
    noisy[~mask] = torch.randint(0, 256, noisy[~mask].shape, dtype=torch.uint8)
    text = model.encode_text(tokens(["a dog", "a cat"]))
    with torch.no_grad():
        ref = model.similarity(text, model.encode_frames(model.normalize(frames), mask), mask)
        noisy_sim = model.similarity(text, model.encode_frames(model.normalize(noisy), mask), mask)
        assert torch.allclose(ref, noisy_sim, atol=ATOL)
        for i, n in enumerate(mask.sum(1).tolist()):  # the same clip with no padding at all
            x = model.normalize(frames[i : i + 1, :n])
            m = torch.ones(1, n, dtype=torch.bool)
            alone = model.similarity(text, model.encode_frames(x, m), m)
            assert torch.allclose(alone[:, 0], ref[:, i], atol=ATOL), (name, linear_patch, tuning, i)
        feats = model.encode_frames(model.normalize(noisy), mask)
        assert torch.all(feats[~mask] == 0)


@pytest.mark.parametrize("tuning", ["full", "unipt"])
@pytest.mark.parametrize("name", TINY)
def test_a_float16_model_scores_padded_clips_as_float32_does(name, tuning):
    """float16 is an export dtype (serving on a GPU): the loose heads normalised the padded
    frames' zero features with F.normalize, whose eps (1e-12) is 0 in float16, and 0 / 0 made
    every clip with a padded frame NaN (indexed as 'not finite', NaN vectors from the API)."""
    model = build(name, tuning=tuning).eval()
    frames, mask = clip_batch(b=3, t=6)
    toks = tokens(["a dog", "a cat"])
    with torch.no_grad():
        want = model.similarity(model.encode_text(toks), model.encode_frames(model.normalize(frames), mask), mask)
        half = model.half()
        got = half.similarity(half.encode_text(toks), half.encode_frames(half.normalize(frames), mask), mask)
    assert bool(torch.isfinite(got).all()), (name, tuning, got)  # (tightTransf scores in float32)
    assert torch.allclose(got.float(), want.float(), atol=0.02 * float(want.abs().max())), (got, want)


def test_meanP_is_masked_mean_of_normalised_frames():
    model = build("test_meanP").eval()
    frames, mask = clip_batch(b=3, t=5)
    clip = model.backbone.clip
    with torch.no_grad():
        video = model.encode_video(model.normalize(frames), mask)
        for i in range(3):
            per_frame = []
            for j in range(5):
                if mask[i, j]:
                    img = model.normalize(frames[i : i + 1, j : j + 1])[0]
                    per_frame.append(clip.encode_image(img, normalize=True)[0])
            by_hand = F.normalize(torch.stack(per_frame).sum(0) / len(per_frame), dim=-1)
            assert torch.allclose(video[i], by_hand, atol=1e-5)


def test_text_is_eot_feature_at_any_length():
    model = build("test_meanP").eval()
    texts = ["a man is cooking pasta", "kids play football"]
    clip = model.backbone.clip
    with torch.no_grad():
        ours32 = model.encode_text(tokens(texts, 32))
        ours77 = model.encode_text(tokens(texts, 77))
        theirs = clip.encode_text(tokens(texts, 77), normalize=True)
    assert torch.allclose(ours77, theirs, atol=1e-6)
    assert torch.allclose(ours32, theirs, atol=1e-5)  # causal mask: padding cannot matter
    # UniPT's side network masks the padding out of its token weights and means
    unipt = build("test_meanP", tuning="unipt").eval()
    with torch.no_grad():
        a, b = unipt.encode_text(tokens(texts, 32)), unipt.encode_text(tokens(texts, 77))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, ours32, atol=1e-3)


def test_unipt_text_side_sees_every_caption_token_up_to_end_of_text():
    """The side network weighs and averages a caption's own tokens: start, words, end of text.
    Token id 0 is padding, and also "!" before another symbol ("wow!("): it was masked out."""
    import open_clip

    unipt = build("test_meanP", tuning="unipt").eval()
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    texts = ["wow!( a red square", "left!/ then up", "kids play football"]
    t = tok(texts)
    assert (t[:2, 2:4] == 0).any(1).all()  # the "!" tokens of the first two captions are id 0
    n = torch.tensor([len(tok.encode(x)) + 2 for x in texts])  # start + words + end, by hand
    valid = torch.arange(16)[None] < n[:, None]
    with torch.no_grad():
        anchor, states = unipt.backbone.encode_text(t, with_states=True)
        want = anchor + unipt.tuning.text(anchor, states, n - 1, valid)
        assert torch.allclose(unipt.encode_text(t), F.normalize(want, dim=-1), atol=1e-6)


def test_unipt_vision_side_reads_each_frames_class_token():
    """UniPT's vision side network adds the token at `pos` = the class token, token 0 of every
    layer state (SideNetwork docstring, specs/unipt.md), to the frame's anchor; padded frames
    stay zero. Token 0 is the class token: before any block it is the same for every frame."""
    unipt = build("test_meanP", tuning="unipt").eval()
    frames, mask = clip_batch(b=2, t=3)
    with torch.no_grad():
        x = unipt.normalize(frames)
        feats, states = unipt.backbone.encode_frames(x, mask, with_states=True)
        assert torch.allclose(states[0][:, 0], states[0][:1, 0].expand(len(states[0]), -1))
        assert not torch.allclose(states[0][0, 1], states[0][1, 1])
        a = feats[mask]
        want = a + unipt.tuning.vision(a, states, torch.zeros(len(a), dtype=torch.long))
        got = unipt.encode_frames(x, mask)
    assert torch.allclose(got[mask], want, atol=1e-6) and not got[~mask].any()


@pytest.mark.parametrize("tuning", ["full", "unipt"])
def test_misshapen_inputs_are_clear_errors(tuning):
    model = build("test_meanP", tuning=tuning).eval()
    tok = tokens(["a dog", "a cat"], 16)
    frames, mask = clip_batch(b=2, t=3)
    x = model.normalize(frames)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"tokens must be \[N, L\]"):
            model.encode_text(tok[0])  # one caption without its batch dimension
        with pytest.raises(ValueError, match=r"mask .* must be \[B, T\] = \[2, 3\]"):
            model.encode_frames(x, mask[:, :2])
        with pytest.raises(ValueError, match=r"frames must be \[B, T, 3, H, W\]"):
            model.encode_frames(x[0], mask[0])  # one clip without its batch dimension


def test_layer_states_are_the_residual_stream_block_by_block():
    bb = build("test_meanP").eval().backbone
    clip, visual = bb.clip, bb.clip.visual
    tok = tokens(["a red square moves left", "a blue circle"], 16)
    frames, mask = clip_batch(b=2, t=3)
    with torch.no_grad():
        text, states = bb.encode_text(tok, with_states=True)
        assert torch.equal(text, bb.encode_text(tok)) and len(states) == clip.transformer.layers + 1
        assert torch.allclose(states[0], clip.token_embedding(tok) + clip.positional_embedding[:16])
        for blk, h, nxt in zip(clip.transformer.resblocks, states, states[1:]):
            assert torch.allclose(blk(h, attn_mask=clip.attn_mask[:16, :16]), nxt, atol=1e-6)
        eot = clip.ln_final(states[-1])[torch.arange(2), tok.argmax(-1)] @ clip.text_projection
        assert torch.allclose(eot, text, atol=1e-6)

        x = bb.normalize(frames)
        feats, states = bb.encode_frames(x, mask, with_states=True)
        assert torch.equal(feats, bb.encode_frames(x, mask))
        n, g = int(mask.sum()), 32 // visual.conv1.stride[0]
        assert len(states) == visual.transformer.layers + 1 and states[0].shape == (n, 1 + g * g, 64)
        for blk, h, nxt in zip(visual.transformer.resblocks, states, states[1:]):
            assert torch.allclose(blk(h), nxt, atol=1e-6)
        assert torch.allclose(visual.ln_post(states[-1][:, 0]) @ visual.proj, feats[mask], atol=1e-6)


def test_unipt_side_network_matches_a_loop_over_samples_layers_and_tokens():
    from clipray.models.tuning import SideNetwork

    torch.manual_seed(0)
    d, w, n_layers, n_tok = 8, 6, 3, 5
    net = SideNetwork(d, [w] * n_layers)
    anchor = torch.randn(4, d)
    states = [torch.randn(4, n_tok, w) for _ in range(n_layers)]
    pos = torch.tensor([0, 2, 4, 1])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    out = net(anchor, states, pos, valid)

    def lin(layer, v):
        return layer.weight @ v + layer.bias

    with torch.no_grad():
        for i in range(4):
            a = lin(net.anchor, anchor[i].relu())
            mixed, scores = [], []
            for proj, h in zip(net.layers, states):
                toks = [lin(proj, h[i, k].relu()) for k in range(n_tok)]
                keep = [k for k in range(n_tok) if valid[i, k]]
                aff = {k: max(0.0, float(a @ toks[k])) for k in keep}
                total = sum(aff.values())
                m = sum((aff[k] / total * toks[k] for k in keep), torch.zeros(d)) if total else torch.zeros(d)
                mixed.append(m + toks[int(pos[i])])
                mean = sum(toks[k] for k in keep) / len(keep)
                scores.append(float(lin(net.confidence, a * mean)))
            conf = torch.tensor(scores).softmax(0)
            by_hand = lin(net.out, sum(c * m for c, m in zip(conf, mixed)).relu())
            assert torch.allclose(out[i], by_hand, atol=1e-5), i


def test_unipt_trains_only_its_side_networks():
    model = build("test_seqTransf", tuning="unipt")
    out = RetrievalTask(model)(*clip_batch(b=2, t=3), tokens(["x", "y"]))
    out["loss"].backward()
    for n, p in model.named_parameters():
        trains = n.startswith(("tuning.", "head."))  # a head with parameters trains too
        assert p.requires_grad == trains, n
        assert (p.grad is not None) == trains, n
    assert [n for n, _ in model.parameter_groups()["backbone"]] == []
    with pytest.raises(NotImplementedError, match="ViT image tower"):
        build("test_meanP", tuning="unipt").tuning.prepare(ClipBackbone(open_clip.create_model("RN50")))


def test_3d_patch_is_inflated_2d_and_equal_at_init():
    model = build("test_meanP", linear_patch="3d").eval()
    bb = model.backbone
    w3, w2 = bb.patch3d.weight, bb.clip.visual.conv1.weight
    assert bb.patch3d.kernel_size == (3, 8, 8) and bb.patch3d.stride == (1, 8, 8)
    assert bb.patch3d.padding == (1, 0, 0)
    assert torch.equal(w3[:, :, 1], w2) and not w3[:, :, 0].any() and not w3[:, :, 2].any()
    as_2d = ClipBackbone(bb.clip, linear_patch="2d")
    frames, mask = clip_batch(b=2, t=4)
    with torch.no_grad():
        x = model.normalize(frames)
        assert torch.allclose(bb.encode_frames(x, mask), as_2d.encode_frames(x, mask), atol=1e-5)
    assert not w2.requires_grad  # unused in 3d mode


@pytest.mark.parametrize("patch", ["2d", "3d"])
def test_what_padded_frames_hold_never_reaches_the_video_embedding(patch):
    """The 3d patch hid padding by multiplying it by 0, and NaN * 0 is NaN: NaN or inf in a
    padded slot of normalised float frames came out in the clip's embedding."""
    model = build("test_meanP", linear_patch=patch).eval()
    frames, mask = clip_batch(b=3, t=6)
    x = model.normalize(frames)
    with torch.no_grad():
        want = model.encode_video(x.masked_fill(~mask[..., None, None, None], 0), mask)
        assert torch.isfinite(want).all()
        for fill in (float("nan"), float("inf"), 1e4):
            got = model.encode_video(x.masked_fill(~mask[..., None, None, None], fill), mask)
            assert torch.equal(got, want), (patch, fill)


@pytest.mark.parametrize("patch, tuning", [("2d", "full"), ("2d", "frozen"), ("3d", "full"), ("2d", "unipt")])
def test_a_batch_without_a_valid_frame_is_refused_in_words(patch, tuning):
    """With the 2d patch under full or frozen tuning, the tower got zero images and failed
    inside open_clip ("cannot reshape tensor of 0 elements")."""
    model = build("test_meanP", linear_patch=patch, tuning=tuning)
    frames, mask = clip_batch(b=2, t=3)
    with pytest.raises(ValueError, match=r"^a clip has no valid frame \(mask all zero\)$"):
        model.encode_video(model.normalize(frames), torch.zeros_like(mask))


@pytest.mark.parametrize("tuning", ["frozen", "unipt"])
def test_3d_patch_with_a_backbone_run_without_autograd_is_refused(tuning):
    """The 3d patch starts as the 2d one and differs only once trained; frozen and unipt run the
    image tower under no_grad, so it never trained and the model was silently the 2d one."""
    with pytest.raises(ValueError, match="linear_patch '3d' needs tuning 'full'"):
        build("test_meanP", linear_patch="3d", tuning=tuning)
    assert build("test_meanP", linear_patch="2d", tuning=tuning).backbone.patch3d is None
    model = build("test_meanP", linear_patch="3d", tuning="full")
    out = RetrievalTask(model)(*clip_batch(b=2, t=3), tokens(["x", "y"]))
    out["loss"].backward()
    grad = model.backbone.patch3d.weight.grad
    assert grad is not None and grad[:, :, 0].abs().sum() > 0 and grad[:, :, 2].abs().sum() > 0


@pytest.mark.parametrize("name", ["test_seqTransf", "test_tightTransf"])
def test_cross_blocks_are_copies_of_clip_text_blocks(name):
    model = build(name)
    clip, head = model.backbone.clip, model.head
    for i, blk in enumerate(head.blocks):
        src = clip.transformer.resblocks[i].state_dict()
        for k, v in blk.state_dict().items():
            assert torch.equal(v, src[k]) and v.data_ptr() != src[k].data_ptr(), (i, k)
        assert blk.ln_1.eps == blk.ln_2.eps == 1e-12
        assert clip.transformer.resblocks[i].ln_1.eps == 1e-5  # the backbone is untouched
    if name == "test_tightTransf":  # the pooled token's LayerNorm too, as the reference's cross model
        assert head.ln_pool.eps == 1e-12
    pos = head.frame_position_embeddings if name == "test_seqTransf" else head.position_embeddings
    assert torch.equal(pos.weight, clip.positional_embedding)


def test_seqLSTM_runs_on_valid_frames_only():
    model = build("test_seqLSTM").eval()
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = model.head.temporal(x, mask)
        first, _ = model.head.lstm(x[:1, :3])
        assert torch.allclose(out[0, :3], first[0] + x[0, :3], atol=1e-6)
        assert torch.equal(out[0, 3:], 2 * x[0, 3:])  # padding refilled with input, + residual
    with pytest.raises(ValueError):
        model.head(x, torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1]]))


def test_seqTransf_with_identity_blocks_adds_frame_positions_and_the_residual():
    """seqTransf (specs/clip4clip.md): frame position embeddings added, the blocks, then the
    residual add of the input. With every block parameter zero each pre-LN block is the
    identity, so a valid frame j comes out as (x_j + P_j) + x_j, positions from 0."""
    model = build("test_seqTransf").eval()
    with torch.no_grad():
        for p in model.head.blocks.parameters():
            p.zero_()
        x = torch.randn(2, 4, 64)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
        want = 2 * x + model.head.frame_position_embeddings.weight[:4]
        assert torch.allclose(model.head.temporal(x, mask)[mask], want[mask], atol=1e-6)


def test_tight_head_equals_a_float64_loop_over_heads():
    """tightTransf (module docstring, specs/clip4clip.md): [text; frames] + positions 0..T, 4
    pre-LN blocks (LN eps 1e-12, per-head softmax(q k^T / sqrt(d_h)) with -1e6 on padded frame
    keys, the text key always valid, QuickGELU MLP), the text token pooled -> ln_pool -> dense
    -> QuickGELU -> score. Weights moved off CLIP's copy by 0.1 randn; clips of 4, 2, 1 frames."""
    model = build("test_tightTransf").eval().double()
    h = model.head
    qgelu = lambda u: u * torch.sigmoid(1.702 * u)  # noqa: E731
    ln = lambda v, m: F.layer_norm(v, (64,), m.weight, m.bias, 1e-12)  # noqa: E731
    with torch.no_grad():
        for p in h.parameters():
            p.add_(0.1 * torch.randn_like(p))
        text, feats = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 4, 64, dtype=torch.float64)
        mask = torch.arange(4)[None] < torch.tensor([4, 2, 1])[:, None]
        got = h(text, feats, mask)
        for i in range(3):
            x = torch.cat([text[i : i + 1], feats[i]]) + h.position_embeddings.weight[:5]
            keys = torch.cat([torch.tensor([True]), mask[i]])
            for blk in h.blocks:
                a, nh = blk.attn, blk.attn.num_heads
                dh = 64 // nh
                q, k, v = (ln(x, blk.ln_1) @ a.in_proj_weight.t() + a.in_proj_bias).split(64, -1)
                heads = []
                for j in range(nh):
                    c = slice(j * dh, (j + 1) * dh)
                    w = (q[:, c] @ k[:, c].t() / dh**0.5).masked_fill(~keys, -1e6).softmax(-1)
                    heads.append(w @ v[:, c])
                x = x + torch.cat(heads, -1) @ a.out_proj.weight.t() + a.out_proj.bias
                x = x + blk.mlp.c_proj(qgelu(blk.mlp.c_fc(ln(x, blk.ln_2))))
            want = h.score(qgelu(h.dense(ln(x[0], h.ln_pool))))[0]
            assert abs(float(got[i]) - float(want)) < 1e-6, (i, float(got[i]), float(want))


def test_one_clip_without_a_valid_frame_is_refused_beside_valid_ones():
    """A clip with no valid frame is refused (heads.check_video_mask), also when another clip of
    the batch has frames: meanP's masked mean was 0 / 0 = NaN for it, tightTransf attended to
    the text alone."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    for name in ("test_meanP", "test_tightTransf"):
        model = build(name).eval()
        with torch.no_grad(), pytest.raises(ValueError, match=r"^a clip has no valid frame \(mask all zero\)$"):
            model.similarity(torch.randn(1, 64), torch.randn(2, 3, 64), mask)


def test_tight_scores_pairs_and_is_not_indexable():
    model = build("test_tightTransf").eval()
    frames, mask = clip_batch(b=3, t=4)
    with torch.no_grad():
        feats = model.encode_frames(model.normalize(frames), mask)
        text = model.encode_text(tokens(["a", "b"]))
        sim = model.similarity(text, feats, mask)
        assert sim.shape == (2, 3)
        assert torch.allclose(sim[1, 2], model.head(text[1:2], feats[2:3], mask[2:3])[0], atol=1e-6)
    with pytest.raises(TypeError):
        model.encode_video(model.normalize(frames), mask)
    assert not model.logit_scale.requires_grad


def test_tight_scores_keep_float32_in_a_bf16_model_and_under_autocast():
    """A bf16 model (GPU evaluation, a bf16 export served as re-ranker) or bf16 autocast (the GPU
    training loop) gave bf16 pair scores: of 200 candidates ~150 distinct, ties that count
    against the query. The score layer runs in float32 on the pooled feature it is given."""
    torch.manual_seed(0)
    model = build("test_tightTransf").eval()
    with torch.no_grad():
        model.head.score.weight.mul_(100)  # trained-like spread of scores
    frames, _ = clip_batch(b=200, t=4)
    mask = torch.arange(4)[None] < torch.arange(200)[:, None] % 4 + 1  # 1 to 4 real frames
    seen = {}

    def keep(_, __, out):
        seen["h"] = out
    model.head.act.register_forward_hook(keep)
    w, b = model.head.score.weight, model.head.score.bias
    for cast, ctx in (("bf16 model", None), ("autocast", torch.autocast("cpu", dtype=torch.bfloat16))):
        m = model.to(torch.bfloat16) if cast == "bf16 model" else model.float()
        with torch.no_grad(), (ctx or torch.autocast("cpu", enabled=False)):
            feats = m.encode_frames(m.normalize(frames), mask)
            text = m.encode_text(tokens(["a dog runs"]))
            sim = m.similarity(text, feats, mask)
        # brute force: the pooled features the head made, through the score layer in float64
        want = (seen["h"].double() @ w.double().t() + b.double()).view(1, 200)
        assert sim.dtype == torch.float32, cast
        assert torch.allclose(sim.double(), want, atol=1e-5), cast
        assert len(set(sim[0].tolist())) == 200, cast


def test_checkpoint_path_loads_exact_open_clip_weights(tmp_path):
    from clipray.models.backbone import register_tiny_configs

    register_tiny_configs()  # this test must not depend on an earlier one having built a model
    torch.manual_seed(123)
    ref = open_clip.create_model(TINY_OPEN_CLIP_NAME)  # stock layout: 0-dim logit_scale
    with torch.no_grad():
        ref.logit_scale.fill_(2.5)
    assert ref.logit_scale.ndim == 0
    path = tmp_path / "tiny_clip.pt"
    torch.save(ref.state_dict(), path)
    model = create_model("test_seqTransf", pretrained=str(path))
    ours = model.backbone.clip.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k].reshape(v.shape), v), k
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 2.5
    # the head was initialised from the loaded weights, not the random ones
    assert torch.equal(model.head.blocks[3].mlp.c_fc.weight, ref.transformer.resblocks[3].mlp.c_fc.weight)


def test_registered_pretrained_weights_are_the_default(tmp_path):
    from clipray.models import ModelSpec, get_spec, register_model
    from clipray.models.backbone import register_tiny_configs

    register_tiny_configs()
    torch.manual_seed(7)
    ref = open_clip.create_model(TINY_OPEN_CLIP_NAME)
    path = tmp_path / "registered.pt"
    torch.save(ref.state_dict(), path)
    name = f"test_registered_weights_{os.getpid()}_{id(path)}"
    register_model(name, ModelSpec(TINY_OPEN_CLIP_NAME, "ViT-B-32", pretrained=str(path)))
    assert get_spec(name).pretrained == str(path)
    want = ref.visual.conv1.weight
    # no override: the registered checkpoint, not a random init
    assert torch.equal(create_model(name).backbone.clip.visual.conv1.weight, want)
    assert torch.equal(build_model(ModelConfig(name=name)).backbone.clip.visual.conv1.weight, want)
    # an explicit "none" still asks for random weights
    assert not torch.equal(create_model(name, pretrained="none").backbone.clip.visual.conv1.weight, want)


def test_frozen_tuning_trains_head_only():
    model = build("test_seqTransf", tuning="frozen")
    out = RetrievalTask(model)(*clip_batch(b=2, t=3), tokens(["x", "y"]))
    out["loss"].backward()
    for n, p in model.named_parameters():
        trains = n.startswith("head.") or n == "backbone.clip.logit_scale"
        assert p.requires_grad == trains, n
        assert (p.grad is not None) == trains, n
    groups = model.parameter_groups()
    assert [n for n, _ in groups["backbone"]] == ["backbone.clip.logit_scale"]


def test_registry_and_config():
    names = clipray.list_models()
    for fam in ("clip4clip_vitb32", "clip4clip_vitb16", "test"):
        assert {f"{fam}_{h}" for h in HEAD_NAMES} <= set(names)
    model = build_model(ModelConfig(name="test_meanP", head="seqLSTM", linear_patch="3d"))
    assert type(model.head).__name__ == "SeqLSTM" and model.backbone.patch3d is not None
    assert model.build_info["name"] == "test_meanP"
    with pytest.raises(ValueError):
        create_model("nope")
    with pytest.raises(ValueError):
        create_model("test_meanP", head="bogus")


def test_clamp_logit_scale():
    model = build("test_meanP")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    task = RetrievalTask(model)
    out = task(*clip_batch(b=2, t=2), tokens(["x", "y"]))
    assert math.isclose(out["logit_scale"].item(), 100.0, rel_tol=1e-5)  # forward caps too
    clamp_logit_scale(task)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)


def test_a_registered_tuning_is_kept_unless_the_config_names_one():
    from clipray.models import ModelSpec, register_model
    from clipray.models.tuning import TUNINGS

    name = f"test_registered_unipt_{os.getpid()}"
    register_model(name, ModelSpec(TINY_OPEN_CLIP_NAME, "ViT-B-32", tuning="unipt"))
    unipt, full = TUNINGS["unipt"], TUNINGS["full"]
    assert isinstance(build_model(ModelConfig(name=name)).tuning, unipt)  # the config named none
    assert isinstance(build_model(ModelConfig(name=name, tuning="full")).tuning, full)
    assert isinstance(build_model(ModelConfig(name="test_meanP")).tuning, full)  # the families' own


def test_bf16_model_normalises_with_the_exact_mean_and_std():
    model = build("test_meanP")
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    model.backbone.set_pixel_stats(mean, std)
    model = model.to(torch.bfloat16)
    assert model.backbone.pixel_stats() == {"mean": mean, "std": std}  # what an export stores
    frames = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    by_hand = (frames.float() / 255 - torch.tensor(mean).view(1, 1, 3, 1, 1)) / torch.tensor(std).view(1, 1, 3, 1, 1)
    got = model.normalize(frames)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, by_hand.to(torch.bfloat16))  # fp32 arithmetic, then one rounding
