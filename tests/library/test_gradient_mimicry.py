"""Gradient Neural Mimicry (the paper's procedure): it learns, it is deterministic, it follows the paper's settings."""

import dataclasses

import pytest
import torch

from peft_recast import RecastConfig
from peft_recast.bank import MimicrySettings
from peft_recast.gradient_mimicry import fit_bank, mimic_template_bank
from peft_recast.layer import RecastLayer
from peft_recast.mimicry import fit_group

from ..models import tiny_bert


def _groups(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 48, generator=generator) * 0.05, "b": torch.randn(2, 48, generator=generator) * 0.05}


SHAPES = {"a": (6, 8), "b": (6, 8)}


def _relative_error(groups, fitted) -> float:
    stacked = torch.cat(list(groups.values()))
    rebuilt = torch.cat([coefficients.mean(1) @ templates for templates, coefficients in fitted.values()])
    return ((rebuilt - stacked).norm() / stacked.norm()).item()


def test_paper_settings_are_the_defaults():
    # official ViT notebook: RMSprop lr 0.1, StepLR(200, 0.1), 1000 steps, clip 1.0, noise 1e-4, SmoothL1 x 2.0;
    # ResNet: lr 0.2, StepLR(500, 0.1), 3000 steps, no noise (shared/research/recast-paper.md §2.1)
    vit = MimicrySettings()
    assert (vit.steps, vit.lr, vit.lr_step, vit.lr_gamma, vit.noise_std, vit.clip_norm, vit.loss_weight) == (
        1000, 0.1, 200, 0.1, 1e-4, 1.0, 2.0
    )
    resnet = MimicrySettings.resnet()
    assert (resnet.steps, resnet.lr, resnet.lr_step, resnet.noise_std) == (3000, 0.2, 500, 0.0)
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        MimicrySettings(steps=0)
    with pytest.raises(ValueError, match="`noise_std`"):
        MimicrySettings(noise_std=-1.0)


def test_gradient_mimicry_reduces_the_reconstruction_loss():
    groups = _groups()
    settings = MimicrySettings(steps=150, lr=0.01, lr_step=75)
    start, start_loss = fit_bank(groups, SHAPES, 3, 2, dataclasses.replace(settings, steps=1), progress=False)
    fitted, best_loss = fit_bank(groups, SHAPES, 3, 2, settings, progress=False)
    assert best_loss < 0.01 * start_loss
    assert _relative_error(groups, fitted) < 0.2 < _relative_error(groups, start)
    templates, coefficients = fitted["a"]
    assert templates.shape == (3, 48) and coefficients.shape == (3, 2, 3)  # n x d, m x K x n
    assert fitted["b"][0].shape == (2, 48)  # n capped at the group's 2 modules


def test_closed_form_is_the_least_squares_floor():
    # Eckart-Young: no rank-n reconstruction beats the truncated SVD, however long gradient mimicry runs
    groups = _groups()
    fitted, _ = fit_bank(groups, SHAPES, 1, 1, MimicrySettings(steps=150, lr=0.01, lr_step=75), progress=False)
    for name, stacked in groups.items():
        svd_error = fit_group(list(stacked), 1).relative_error
        gradient_error = _relative_error({name: stacked}, {name: fitted[name]})
        assert gradient_error >= svd_error - 1e-6


def test_deterministic_under_a_seed():
    groups = _groups()
    settings = MimicrySettings(steps=20)
    first, loss1 = fit_bank(groups, SHAPES, 2, 2, settings, progress=False)
    second, loss2 = fit_bank(groups, SHAPES, 2, 2, settings, progress=False)
    other, _ = fit_bank(groups, SHAPES, 2, 2, dataclasses.replace(settings, seed=7), progress=False)
    assert loss1 == loss2
    for name in groups:
        assert torch.equal(first[name][0], second[name][0]) and torch.equal(first[name][1], second[name][1])
        assert not torch.equal(first[name][0], other[name][0])


def test_progress_bar(capsys):
    fit_bank(_groups(), SHAPES, 2, 1, MimicrySettings(steps=3), progress=True)
    assert "RECAST gradient mimicry" in capsys.readouterr().err


def test_mimic_template_bank_leaves_the_model_unchanged():
    model = tiny_bert()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    config = RecastConfig(target_modules=["query", "value"], layers_per_group=2)
    bank = mimic_template_bank(model, config, MimicrySettings(steps=5), progress=False)
    assert not any(isinstance(module, RecastLayer) for module in model.modules())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert sorted(bank.groups) == sorted(
        f"encoder.layer.{g}.attention.self.{role}" for g in ("0-1", "2-3") for role in ("query", "value")
    )
    entry = bank.groups["encoder.layer.2-3.attention.self.value"]
    assert entry.members == [["encoder.layer.2.attention.self.value"], ["encoder.layer.3.attention.self.value"]]
    assert entry.fingerprint == pytest.approx(fit_group(
        [model.encoder.layer[i].attention.self.value.weight for i in (2, 3)], 2
    ).fingerprint())
    assert config.base_fingerprint is None  # the caller's config is not touched
