"""transformers' own adapter API (``PeftAdapterMixin``) on a plain model, with RECAST adapters.

``model.add_adapter(RecastConfig(...))``, ``model.load_adapter(path)``, ``set_adapter``, ``disable_adapters`` /
``enable_adapters``, ``delete_adapter`` and ``save_pretrained`` are transformers' code paths (not ``PeftModel``'s).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer

from ..models import tiny_bert

# transformers adds a second adapter to a model through PEFT's ``inject_adapter_in_model``, which warns about the
# ``peft_config`` already there for every PEFT method: the tests that add two adapters expect it.
SECOND_ADAPTER_NOTE = "ignore:Already found a `peft_config` attribute in the model:UserWarning:peft.tuners"


def _hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).last_hidden_state


def _recast_layers(model) -> list[RecastLayer]:
    return [module for module in model.modules() if isinstance(module, RecastLayer)]


@pytest.mark.filterwarnings(SECOND_ADAPTER_NOTE)
def test_add_set_disable_delete_adapters(input_ids):
    model = tiny_bert()
    base = _hidden(model, input_ids)
    model.add_adapter(RecastConfig(init_weights=False), adapter_name="a")
    assert model.active_adapters() == ["a"]
    assert len(_recast_layers(model)) == 8  # query + value in 4 layers
    out_a = _hidden(model, input_ids)
    assert not torch.allclose(out_a, base, atol=1e-4)

    model.add_adapter(RecastConfig(init_weights=False, target_modules=["value"], num_templates=1), adapter_name="b")
    model.set_adapter("b")
    assert model.active_adapters() == ["b"]
    out_b = _hidden(model, input_ids)
    assert not torch.allclose(out_b, out_a, atol=1e-4) and not torch.allclose(out_b, base, atol=1e-4)
    # adapter "b" owns 1 template x 2 row blocks per value layer, adapter "a" keeps its 2 x 2 per query and value layer
    value = model.encoder.layer[0].attention.self.value
    assert value.recast_coefficients["b"].shape == (1, 1, 2) and value.recast_coefficients["a"].shape == (1, 2, 2)
    assert "b" not in model.encoder.layer[0].attention.self.query.recast_coefficients
    assert all(layer.recast_coefficients["b"].requires_grad for layer in _recast_layers(model)
               if "b" in layer.recast_coefficients)

    model.disable_adapters()
    torch.testing.assert_close(_hidden(model, input_ids), base)
    model.enable_adapters()
    torch.testing.assert_close(_hidden(model, input_ids), out_b)

    model.set_adapter("a")
    torch.testing.assert_close(_hidden(model, input_ids), out_a)
    model.delete_adapter("b")
    assert set(model.peft_config) == {"a"}
    assert all("b" not in layer.recast_coefficients for layer in _recast_layers(model))
    torch.testing.assert_close(_hidden(model, input_ids), out_a)
    model.delete_adapter("a")
    torch.testing.assert_close(_hidden(model, input_ids), base)


@pytest.mark.filterwarnings(SECOND_ADAPTER_NOTE)
def test_load_adapter_saved_by_peft(tmp_path, input_ids):
    peft_model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False))
    expected = _hidden(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path)

    model = tiny_bert()
    base = _hidden(model, input_ids)
    model.load_adapter(str(tmp_path))
    assert model.active_adapters() == ["default"]
    torch.testing.assert_close(_hidden(model, input_ids), expected)
    model.load_adapter(str(tmp_path), adapter_name="second")
    model.set_adapter("second")
    torch.testing.assert_close(_hidden(model, input_ids), expected)
    model.disable_adapters()
    torch.testing.assert_close(_hidden(model, input_ids), base)


def test_adapter_added_by_transformers_saves_and_reloads_with_peft(tmp_path, input_ids):
    from peft import PeftModel

    model = tiny_bert()
    model.add_adapter(RecastConfig(init_weights=False))
    expected = _hidden(model, input_ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "RECAST" and set(config["base_fingerprint"]) == {
        f"encoder.layer.{g}.attention.self.{role}" for g in ("0-1", "2-3") for role in ("query", "value")
    }
    torch.testing.assert_close(_hidden(PeftModel.from_pretrained(tiny_bert(), tmp_path), input_ids), expected)


def test_load_adapter_onto_another_base_model_is_refused(tmp_path):
    get_peft_model(tiny_bert(seed=0), RecastConfig(init_weights=False)).save_pretrained(tmp_path)
    other = tiny_bert(seed=1)
    with pytest.raises(ValueError, match="does not belong to this base model"):
        other.load_adapter(str(tmp_path))
    assert not _recast_layers(other)
