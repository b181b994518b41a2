"""The pair loss and the symmetric cross entropy on their own (the gathered loss across workers
is tested in test_loss_dist.py)."""

import math

import pytest
import torch

from clipray.losses import LOGIT_SCALE_MAX, ContrastiveLoss, PairLoss, symmetric_cross_entropy


def test_symmetric_cross_entropy_by_hand():
    s = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    t2v = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(math.e**3 / (math.e + math.e**3))) / 2
    v2t = (-math.log(math.e**2 / (math.e**2 + math.e)) - math.log(math.e**3 / (1 + math.e**3))) / 2
    assert symmetric_cross_entropy(s).item() == pytest.approx((t2v + v2t) / 2, rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (4,)])
def test_pair_logits_that_are_not_square_are_a_clear_error(shape):
    # a cross-encoder batch of 2 captions and 3 clips has no diagonal of matching pairs
    with pytest.raises(ValueError, match="square"):
        PairLoss()(torch.randn(*shape))


@pytest.mark.parametrize("at", [LOGIT_SCALE_MAX, 2.0])
def test_the_temperature_gets_the_gradient_of_exp_at_its_cap_and_below(at):
    """`clamp_logit_scale` leaves the parameter exactly at ln(100) (pretrained CLIP starts there),
    where a clamp in the forward gave it a gradient of 0: it could never come down again (with
    tuning=frozen, the only parameter that trains). Its gradient must be that of a plain
    exp(logit_scale) loss, written out by hand here."""
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    video = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    ours, ref = (torch.tensor([at], requires_grad=True) for _ in range(2))
    ContrastiveLoss()(text, video, ours).backward()
    logits, labels = ref.exp() * text @ video.t(), torch.arange(4)
    ((torch.nn.functional.cross_entropy(logits, labels)
      + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2).backward()
    assert ref.grad.abs().item() > 0.1 and ours.grad.item() == pytest.approx(ref.grad.item(), rel=1e-5)


def test_a_temperature_past_the_cap_is_used_at_the_cap():
    """Between an optimiser step and the clamp after it, the forward still caps the scale at 100."""
    text = video = torch.eye(2)
    past = ContrastiveLoss()(text, video, torch.tensor([LOGIT_SCALE_MAX + 1.0]))
    assert past.item() == pytest.approx(ContrastiveLoss()(text, video, torch.tensor([LOGIT_SCALE_MAX])).item())
    assert past.item() == pytest.approx(math.log(1 + math.exp(-100.0)), abs=1e-12)
