"""`benchmarks/decoder_lr.py` at a tiny size: the default trains a (briefly pretrained) decoder LM at the recommended
rate and at three times it: the held-back loss falls and never rises more than 5 % above its start."""

import pytest

from peft_recast import RECOMMENDED_LR

from ..helpers import import_benchmark


@pytest.fixture(scope="module")
def decoder_lr():
    return import_benchmark("decoder_lr")


@pytest.mark.parametrize("factor", [1, 3])
def test_held_back_loss_falls_and_never_rises(decoder_lr, factor):
    base = decoder_lr.pretrained(layers=4, steps=60)
    losses = decoder_lr.adapt(base, factor * RECOMMENDED_LR, steps=50)
    assert losses[-1] < 0.995 * losses[0], losses  # 16 coefficients of a 4-layer model: a small, real fall
    assert max(losses) <= 1.05 * losses[0], losses
    assert not any(hasattr(module, "recast_coefficients") for module in base.modules())  # unloaded: the base again
