"""`RecastConfig(coefficient_sharing="position")`: a number of coefficients that does not grow with depth."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from peft_recast import RecastConfig, hotswap_adapter, load_adapters

from ..models import llama_kwargs, model_output

IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [30, 26, 22, 18, 14, 10]])


def _llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**llama_kwargs(layers=layers)))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("layers", [2, 4, 5, 30])
def test_count_is_roles_x_positions_x_templates_x_blocks_whatever_the_depth(layers):
    shared = get_peft_model(_llama(layers), RecastConfig(coefficient_sharing="position", coefficient_blocks=6))
    assert _trainable(shared) == 2 * 2 * 2 * 6  # q/v x 2 positions per group x 2 templates x 6 blocks = 48
    per_module = get_peft_model(_llama(layers), RecastConfig(coefficient_blocks=6))
    assert _trainable(per_module) == 2 * layers * 2 * 6 - (2 * 6 if layers % 2 else 0)  # a 1-layer group: 1 template


def test_shared_coefficients_act_on_each_groups_own_templates(tmp_path):
    """Equal to the per-module adapter whose every module holds its position's shared coefficients (a 1-layer last
    group uses the first of them); trains, saves in PEFT's key format and reloads."""
    shared = get_peft_model(_llama(5), RecastConfig(coefficient_sharing="position")).eval()
    owners = {}
    for name, parameter in shared.named_parameters():
        if parameter.requires_grad:
            owners[name] = parameter
            parameter.data.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(owners))))
    assert len(owners) == 4  # q and v, positions 0 and 1: layers 0 and 1 own them
    assert all(".layers.0." in name or ".layers.1." in name for name in owners)
    per_module = get_peft_model(_llama(5), RecastConfig()).eval()
    for key, layer in per_module.base_model.named_modules():
        if hasattr(layer, "recast_coefficients") and "default" in layer.recast_coefficients:
            index = int(key.split(".layers.")[1].split(".")[0])
            role = key.rsplit(".", 1)[1]
            owner = next(p for n, p in owners.items() if f".layers.{index % 2}." in n and role in n)
            target = layer.recast_coefficients["default"]
            target.data.copy_(owner.data[:, : target.shape[1]])
    expected = model_output(per_module, IDS)
    torch.testing.assert_close(model_output(shared, IDS), expected)
    shared.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # each shared tensor once, under its owner's key in PEFT's format (not 10 entries, one per module)
    assert sorted(saved) == sorted(name.replace(".default", "") for name in owners)
    reloaded = PeftModel.from_pretrained(_llama(5), tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded, IDS), expected)
    assert _trainable(PeftModel.from_pretrained(_llama(5), tmp_path, is_trainable=True)) == 16
    # one step moves every module through its shared tensor
    shared.train()
    model_output(shared, IDS).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owners.values())


def test_second_adapter_and_mixed_batch_keep_the_sharing():
    model = get_peft_model(_llama(4), RecastConfig(coefficient_sharing="position", init_weights=False)).eval()
    model.add_adapter("task_b", RecastConfig(coefficient_sharing="position", init_weights=False))
    model.set_adapter("task_b")
    assert _trainable(model) == 16
    mixed = model_output(model, IDS, adapter_names=["default", "task_b"])
    model.set_adapter("default")
    torch.testing.assert_close(mixed[0], model_output(model, IDS)[0])
    model.set_adapter("task_b")
    torch.testing.assert_close(mixed[1], model_output(model, IDS)[1])


def test_bad_sharing_is_refused():
    with pytest.raises(ValueError, match="`coefficient_sharing` must be 'module' or 'position'"):
        RecastConfig(coefficient_sharing="layer")
    with pytest.raises(ValueError, match="weight_form='residual' or coefficient_sharing='module'"):
        RecastConfig(coefficient_sharing="position", weight_form="replace")
    model = get_peft_model(_llama(4), RecastConfig(coefficient_sharing="position"))
    model.add_adapter("per_module", RecastConfig())
    with pytest.raises(ValueError, match="coefficient_sharing"):
        model.add_weighted_adapter(["default", "per_module"], [0.5, 0.5], "mix")


def test_replacement_form_files_written_with_sharing_still_load(tmp_path):
    """A new adapter with shared coefficients in the replacement form is refused (one tensor cannot start at every
    module's mimicked coefficients); a file written before the refusal holds trained coefficients and loads as saved."""
    model = get_peft_model(_llama(4), RecastConfig(coefficient_sharing="position", init_weights=False)).eval()
    model.peft_config["default"].weight_form = "replace"  # as an older version wrote such a file
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(_llama(4), tmp_path)
    assert reloaded.peft_config["default"].weight_form == "replace"
    loaded = {name.replace(".default", ""): parameter for name, parameter in reloaded.named_parameters()
              if ".recast_coefficients." in name}
    assert saved and all(torch.equal(loaded[key], tensor) for key, tensor in saved.items())


def _every_module_key(model, folder):
    """Rewrite ``folder``'s adapter as files were written before: every module's key, tied ones included."""
    tensors = {
        name.replace(".default", ""): parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if ".recast_coefficients." in name
    }
    tensors.update({
        f"base_model.model.{key}.recast_coefficients": layer.recast_coefficients["default"].detach().clone()
        for key, layer in model.base_model.model.named_modules()
        if hasattr(layer, "recast_tie") and "default" in layer.recast_tie
    })
    save_file(tensors, folder / "adapter_model.safetensors")
    return tensors


@pytest.mark.parametrize("settings", [
    {"coefficient_sharing": "position"},
    {"target_modules": ["q_proj", "k_proj", "v_proj"], "fused_modules": ["q_proj", "k_proj", "v_proj"]},
], ids=["position", "fused"])
def test_files_hold_each_shared_tensor_once_and_older_files_still_load(tmp_path, settings):
    model = get_peft_model(_llama(4), RecastConfig(init_weights=False, **settings)).eval()
    expected = model_output(model, IDS)
    model.save_pretrained(tmp_path / "new")
    saved = load_file(tmp_path / "new" / "adapter_model.safetensors")
    assert len(saved) == sum(1 for p in model.parameters() if p.requires_grad)  # one entry per distinct tensor
    assert all(key.endswith(".recast_coefficients") for key in saved)
    (tmp_path / "old").mkdir()
    model.peft_config["default"].save_pretrained(tmp_path / "old")
    old = _every_module_key(model, tmp_path / "old")
    assert len(old) > len(saved)
    for folder in ("new", "old"):
        reloaded = PeftModel.from_pretrained(_llama(4), tmp_path / folder).eval()
        torch.testing.assert_close(model_output(reloaded, IDS), expected)
        # hotswap and bulk loading read the same files
        fresh = get_peft_model(_llama(4), RecastConfig(**settings)).eval()
        hotswap_adapter(fresh, str(tmp_path / folder), "default")
        torch.testing.assert_close(model_output(fresh, IDS), expected)
        load_adapters(fresh, [str(tmp_path / folder)], ["loaded"])
        fresh.set_adapter("loaded")
        torch.testing.assert_close(model_output(fresh, IDS), expected)
        # transformers' own adapter loading fills the sharing modules through their owner's tensor
        plain = _llama(4)
        plain.load_adapter(str(tmp_path / folder), adapter_name="task")
        torch.testing.assert_close(model_output(plain.eval(), IDS), expected)
