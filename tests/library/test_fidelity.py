"""Fidelity report: reconstruction error, weight and output cosines; closed form vs gradient (the CLI that prints it:
``tests/apps/test_cli_commands.py``)."""

import time

import pytest
import torch

from peft_recast import RecastConfig
from peft_recast.bank import MimicrySettings, load_template_bank
from peft_recast.fidelity import compare_mimicry, fidelity_report
from peft_recast.layer import RecastLayer
from peft_recast.mimicry import fit_group

from ..models import tiny_bert


@pytest.fixture
def inputs() -> dict:
    return {"input_ids": torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(4))}


def test_closed_form_with_n_equal_to_m_is_exact(inputs):
    model = tiny_bert()
    report = fidelity_report(model, RecastConfig(target_modules=["query", "value"], layers_per_group=2), inputs)
    assert not any(isinstance(module, RecastLayer) for module in model.modules())  # model left as it was
    assert len(report.groups) == 4
    for group in report.groups:
        assert group.relative_error < 1e-6
        assert group.weight_cosine_min == pytest.approx(1, abs=1e-9)
        assert group.output_cosine_min == pytest.approx(1, abs=1e-9)
    assert report.output_cosine == pytest.approx(1, abs=1e-9)


def test_compressing_groups_shows_the_svd_error_and_lower_cosines(inputs):
    model = tiny_bert()
    report = fidelity_report(model, RecastConfig(target_modules=["value"], layers_per_group=4, num_templates=1), inputs)
    (group,) = report.groups
    weights = [layer.attention.self.value.weight for layer in model.encoder.layer]
    assert group.relative_error == pytest.approx(fit_group(weights, 1).relative_error, rel=1e-6)
    assert group.weight_cosine_min < 0.99 and group.output_cosine_min < 0.99
    assert group.output_cosine_min <= group.output_cosine_mean <= 1


def test_closed_form_vs_gradient_side_by_side(tmp_path, inputs):
    config = RecastConfig(target_modules=["query", "value"], layers_per_group=4, num_templates=2)
    start = time.perf_counter()
    closed, gradient = compare_mimicry(
        tiny_bert(), config, inputs, str(tmp_path), MimicrySettings(steps=80, lr=0.01, lr_step=40), progress=False
    )
    elapsed = time.perf_counter() - start
    assert [g.name for g in closed.groups] == [g.name for g in gradient.groups]
    # the two wall times are measured (not NaN), in seconds, and each covers a part of the call
    assert 0 < closed.seconds and 0 < gradient.seconds and closed.seconds + gradient.seconds <= elapsed
    assert gradient.seconds == load_template_bank(str(tmp_path)).seconds  # the gradient time is the bank's own
    assert gradient.method == "gradient, 80 steps" and closed.method == "closed form"
    for c, g in zip(closed.groups, gradient.groups):
        assert g.relative_error >= c.relative_error - 1e-6  # the closed form is the least-squares optimum
        assert g.relative_error < 1  # but the gradient fit learned something
    assert load_template_bank(str(tmp_path)).settings.steps == 80
