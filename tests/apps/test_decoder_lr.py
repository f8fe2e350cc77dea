"""`benchmarks/decoder_lr.py` at a tiny size: the default trains a (briefly pretrained) decoder LM at the recommended
rate and at three times it: the held-back loss falls and never rises more than 5 % above its start."""

import sys
from pathlib import Path

import pytest

from peft_recast import RECOMMENDED_LR

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def decoder_lr():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import decoder_lr
    finally:
        sys.path.pop(0)
    return decoder_lr


@pytest.mark.parametrize("factor", [1, 3])
def test_held_back_loss_falls_and_never_rises(decoder_lr, factor):
    base = decoder_lr.pretrained(layers=4, steps=60)
    losses = decoder_lr.adapt(base, factor * RECOMMENDED_LR, steps=50)
    assert losses[-1] < 0.995 * losses[0], losses  # 16 coefficients of a 4-layer model: a small, real fall
    assert max(losses) <= 1.05 * losses[0], losses
    assert not any(hasattr(module, "recast_coefficients") for module in base.modules())  # unloaded: the base again
