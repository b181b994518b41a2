"""The gathered contrastive loss: 2 gloo workers == 1 process on the joined batch, grads too."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ports import free_ports
from clipray.losses import ContrastiveLoss, PairLoss, symmetric_cross_entropy
from clipray.models import create_model
from clipray.task import RetrievalTask

NAME = "test_seqTransf"  # a loose head with parameters of its own
B, T = 4, 3


def batch():
    g = torch.Generator().manual_seed(7)
    frames = torch.randint(0, 256, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    texts = ["a dog runs", "a cat sleeps", "a car drives", "a bird sings"]
    return frames, mask, open_clip.get_tokenizer("ViT-B-32")(texts, context_length=16)


def task():
    torch.manual_seed(0)
    return RetrievalTask(create_model(NAME))


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        t = task()
        frames, mask, tokens = batch()
        part = slice(rank * B // world, (rank + 1) * B // world)
        loss = t(frames[part], mask[part], tokens[part])["loss"]
        loss.backward()
        # What DeepSpeed does with the workers' gradients: average them.
        grads = {}
        for n, p in t.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[n] = g / world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"loss": mean_loss / world, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_equal_one_process_on_joined_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_ports()[0], str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "dist.pt")

    t = task()
    loss = t(*batch())["loss"]
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-6), (got["loss"], loss)
    n_checked = 0
    for n, p in t.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = max(1.0, ref.abs().max().item())  # float32 summation-order noise only
        assert torch.allclose(got["grads"][n], ref, atol=1e-5 * scale, rtol=1e-4), n
        n_checked += int(ref.abs().sum() > 0)
    assert n_checked > 20  # backbone, head and logit_scale all carry gradient
    assert got["grads"]["model.backbone.clip.logit_scale"].abs().sum() > 0


def test_single_process_loss_is_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    video = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor([3.0])
    logits = 20.085536923187668 * text @ video.t()
    labels = torch.arange(5)
    by_hand = (torch.nn.functional.cross_entropy(logits, labels)
               + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(ContrastiveLoss()(text, video, scale), by_hand, atol=1e-5)
    assert torch.allclose(symmetric_cross_entropy(logits), by_hand)
    # the temperature is capped at 100 in the forward
    capped = ContrastiveLoss()(text, video, torch.tensor([9.0]))
    assert torch.allclose(capped, symmetric_cross_entropy(100.0 * text @ video.t()), atol=1e-5)


def test_tight_loss_uses_local_pair_scores():
    torch.manual_seed(0)
    model = create_model("test_tightTransf")
    frames, mask, tokens = batch()
    out = RetrievalTask(model)(frames, mask, tokens)
    with torch.no_grad():
        text = model.encode_text(tokens)
        sim = model.similarity(text, model.encode_frames(model.normalize(frames), mask), mask)
    assert sim.shape == (B, B)
    assert torch.allclose(out["loss"], PairLoss()(sim), atol=1e-6)
    assert out["logit_scale"].item() == 1.0


def test_mismatched_pairs_rejected():
    with pytest.raises(ValueError):
        ContrastiveLoss()(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([1.0]))
