"""Template banks: saved once per base model, loaded by path or Hub id, referenced by adapters whose files still hold
only coefficients; both weight forms keep the identity / merge / save / load / mixed-batch guarantees."""

import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_recast import RecastConfig, recast_summary
from peft_recast import bank as bank_module
from peft_recast.bank import (
    BANK_FILE,
    MimicrySettings,
    load_template_bank,
    resolve_template_bank,
    save_template_bank,
)
from peft_recast.gradient_mimicry import mimic_template_bank
from peft_recast.layer import RecastLayer

from ..models import model_output, tiny_bert

GROUPING = {"target_modules": ["query", "key", "value"], "fused_modules": ["query", "key", "value"],
            "layers_per_group": 2, "num_templates": 2, "num_coefficient_sets": 2}


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("bank")
    bank = mimic_template_bank(tiny_bert(), RecastConfig(**GROUPING), MimicrySettings(steps=60), progress=False)
    save_template_bank(bank, str(directory))
    return str(directory)


def _config(bank_dir: str, **kwargs) -> RecastConfig:
    return RecastConfig(**GROUPING, template_bank=bank_dir, **kwargs)


def test_bank_round_trip(bank_dir, tmp_path):
    bank = load_template_bank(bank_dir)
    assert bank.source == bank_dir and bank.settings.steps == 60 and bank.num_coefficient_sets == 2
    again = tmp_path / "copy.safetensors"
    save_template_bank(bank, str(again))
    copy = load_template_bank(str(again))
    assert list(copy.groups) == list(bank.groups) == [
        "encoder.layer.0-1.attention.self.query+key+value", "encoder.layer.2-3.attention.self.query+key+value"
    ]
    for name, entry in bank.groups.items():
        assert torch.equal(copy.groups[name].templates, entry.templates)
        assert torch.equal(copy.groups[name].coefficients, entry.coefficients)
        assert copy.groups[name].members == entry.members and copy.groups[name].fingerprint == entry.fingerprint
        assert entry.templates.shape == (2, 3 * 32 * 32)  # fused q/k/v rows, as the paper's qkv bank
    assert copy.settings == bank.settings and copy.best_loss == bank.best_loss
    assert [p.name for p in tmp_path.iterdir()] == ["copy.safetensors"]  # atomic write leaves no temporary file


def test_residual_form_is_the_base_model_at_init_and_saves_only_coefficients(bank_dir, tmp_path, input_ids):
    base = tiny_bert()
    expected = model_output(base, input_ids)
    model = get_peft_model(base, _config(bank_dir))
    assert torch.equal(model_output(model, input_ids), expected)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    adapted = model_output(model, input_ids)
    assert not torch.allclose(adapted, expected)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(key.endswith(".recast_coefficients") for key in tensors)
    assert {tuple(t.shape) for t in tensors.values()} == {(2, 2, 2)}  # K x n x B: no template in the adapter file
    assert recast_summary(model).coefficients == 4 * 2 * 2 * 2  # one fused q/k/v tensor per layer
    bank_module._LOADED.clear()  # the templates come from the bank file again, not from memory
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert reloaded.peft_config["default"].template_bank == bank_dir
    torch.testing.assert_close(model_output(reloaded, input_ids), adapted)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, input_ids), adapted, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(model_output(model, input_ids), expected)


def test_replace_form_is_the_papers_mimicked_model(bank_dir, tmp_path, input_ids):
    bank = load_template_bank(bank_dir)
    # the paper's form: one coefficient per template (alpha_0 is K x n), so one block of rows
    model = get_peft_model(tiny_bert(), _config(bank_dir, weight_form="replace", coefficient_blocks=1))
    entry = bank.groups["encoder.layer.2-3.attention.self.query+key+value"]
    value = model.base_model.model.encoder.layer[3].attention.self.value
    # W = mean_K(alpha_0) @ T: the value rows of layer 3's fused reconstruction
    rebuilt = entry.reconstruction()[1, 2 * 32 * 32 :].reshape(32, 32)
    torch.testing.assert_close(value.get_base_layer().weight + value.get_delta_weight("default"), rebuilt)
    torch.testing.assert_close(value.recast_coefficients["default"][..., 0], entry.coefficients[1])  # alpha_0
    adapted = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(model_output(reloaded, input_ids), adapted)
    weights = {n: m.get_base_layer().weight.clone() for n, m in reloaded.named_modules() if isinstance(m, RecastLayer)}
    reloaded.merge_adapter()
    torch.testing.assert_close(model_output(reloaded, input_ids), adapted, atol=1e-5, rtol=1e-4)
    reloaded.unmerge_adapter()
    assert all(torch.equal(m.get_base_layer().weight, weights[n]) for n, m in reloaded.named_modules() if n in weights)


def test_mixed_batch_of_bank_and_closed_form_adapters(bank_dir, input_ids):
    model = get_peft_model(tiny_bert(), _config(bank_dir, init_weights=False), adapter_name="bank")
    model.add_adapter("closed", RecastConfig(**GROUPING, init_weights=False))
    model.add_adapter("paper", _config(bank_dir, weight_form="replace"))
    model.eval()
    alone = {}
    for name in ("bank", "closed", "paper"):
        model.set_adapter(name)
        alone[name] = model_output(model, input_ids)
    names = ["paper", "closed", "bank", "__base__"]
    mixed = model_output(model, input_ids, adapter_names=names)
    with model.disable_adapter():
        alone["__base__"] = model_output(model, input_ids)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-4)


def test_bank_of_another_base_model_is_refused(bank_dir):
    other = tiny_bert(seed=1)
    with pytest.raises(ValueError, match="was fitted to another base model"):
        get_peft_model(other, _config(bank_dir))
    assert not any(isinstance(module, RecastLayer) for module in other.modules())


def test_bank_for_another_grouping_is_refused(bank_dir):
    config = RecastConfig(**{**GROUPING, "layers_per_group": 4}, template_bank=bank_dir)
    with pytest.raises(ValueError, match=r"has no template group 'encoder.layer.0-3.attention.self.query\+key"):
        get_peft_model(tiny_bert(), config)
    with pytest.raises(ValueError, match="has num_templates=2 but the adapter asks for 1"):
        get_peft_model(tiny_bert(), RecastConfig(**{**GROUPING, "num_templates": 1}, template_bank=bank_dir))


def test_missing_and_damaged_banks(bank_dir, tmp_path):
    with pytest.raises(ValueError, match="holds no RECAST template bank"):
        load_template_bank(str(tmp_path))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(Path(resolve_template_bank(bank_dir)).read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged"):
        load_template_bank(str(damaged))
    with pytest.raises(ValueError, match="Cannot find the RECAST template bank 'nobody/no-such-bank'"):
        load_template_bank("nobody/no-such-bank")


def test_bank_loads_by_hub_id_from_the_offline_cache(bank_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--recast--tiny-bert-bank"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / BANK_FILE).write_bytes(Path(resolve_template_bank(bank_dir)).read_bytes())
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_template_bank("recast/tiny-bert-bank") == os.path.join(repo, "snapshots", commit, BANK_FILE)
    model = get_peft_model(tiny_bert(), RecastConfig(**GROUPING, template_bank="recast/tiny-bert-bank"))
    assert model.peft_config["default"].template_bank == "recast/tiny-bert-bank"
