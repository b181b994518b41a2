"""The pair loss and the symmetric cross entropy on their own (the gathered loss across workers
is tested in test_loss_dist.py)."""

import math

import pytest
import torch

from clipray.losses import PairLoss, symmetric_cross_entropy


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
