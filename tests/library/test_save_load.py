"""Adapter files: coefficients only, reload in a fresh process, fingerprint checks."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_recast import RecastConfig, recast_summary
from peft_recast.layer import RecastLayer

from ..models import CONFIG_FIELDS, MODEL_BUILDERS, model_output, tiny_bert, tiny_bert_classifier

REPO = Path(__file__).resolve().parents[2]


def _trained(model_kind: str, seed: int = 0):
    config = RecastConfig(init_weights=False, **CONFIG_FIELDS[model_kind])
    model = get_peft_model(MODEL_BUILDERS[model_kind](seed=seed), config)
    return model


def test_file_holds_only_coefficients(tmp_path, model_kind):
    model = _trained(model_kind)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(key.endswith(".recast_coefficients") for key in tensors)
    assert sum(t.numel() for t in tensors.values()) == recast_summary(model).coefficients
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "RECAST" and config["base_fingerprint"]
    assert (tmp_path / "adapter_model.safetensors").stat().st_size == recast_summary(model).adapter_bytes


def test_reload_in_a_fresh_process(tmp_path, model_kind, input_ids):
    model = _trained(model_kind)
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input_ids": input_ids, "output": model_output(model, input_ids)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import peft_recast
        from peft import PeftModel
        from tests.models import MODEL_BUILDERS, model_output
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(MODEL_BUILDERS[{model_kind!r}](), {str(tmp_path / "adapter")!r})
        assert type(model.peft_config["default"]).__name__ == "RecastConfig"
        torch.testing.assert_close(model_output(model, expected["input_ids"]), expected["output"])
        print("RELOADED OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert "RELOADED OK" in result.stdout, result.stderr[-3000:]


def test_several_adapters_save_and_load(tmp_path, input_ids):
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False))
    model.add_adapter("task_b", RecastConfig(init_weights=False, target_modules=["key"]))
    outputs = {}
    for name in ("default", "task_b"):
        model.set_adapter(name)
        outputs[name] = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "task_b" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    loaded.load_adapter(tmp_path / "task_b", adapter_name="task_b")
    for name, expected in outputs.items():
        loaded.set_adapter(name)
        torch.testing.assert_close(model_output(loaded, input_ids), expected)


def test_low_cpu_mem_usage_load(tmp_path, input_ids):
    model = _trained("bert")
    expected = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(model_output(loaded, input_ids), expected)


def test_wrong_base_model_is_refused_and_left_clean(tmp_path):
    _trained("bert", seed=0).save_pretrained(tmp_path)
    other = tiny_bert(seed=1)
    with pytest.raises(ValueError, match="does not belong to this base model: group 'encoder.layer.0-1"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, RecastLayer) for m in other.modules())

    with pytest.raises(ValueError, match="not in this model"):
        PeftModel.from_pretrained(tiny_bert(layers=2), tmp_path)


def test_adapter_loads_onto_a_half_precision_copy_of_its_base(tmp_path, input_ids):
    model = _trained("bert")
    expected = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert().to(torch.bfloat16), tmp_path)
    torch.testing.assert_close(model_output(loaded, input_ids).float(), expected, atol=0.1, rtol=0.1)


def test_merged_base_model_is_refused(tmp_path):
    model = _trained("bert")
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="does not belong to this base model"):
        PeftModel.from_pretrained(merged, tmp_path)


def test_second_adapter_from_other_base_is_refused_without_side_effects(tmp_path, input_ids):
    _trained("bert", seed=1).save_pretrained(tmp_path)
    model = _trained("bert", seed=0)
    before = model_output(model, input_ids)
    with pytest.raises(ValueError, match="does not belong"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert "other" not in model.peft_config
    assert all("other" not in layer.recast_coefficients for layer in model.modules() if isinstance(layer, RecastLayer))
    assert torch.equal(model_output(model, input_ids), before)


def test_classifier_head_is_saved_with_the_coefficients(tmp_path):
    base = tiny_bert_classifier(seed=0, num_labels=3).eval()
    model = get_peft_model(base, RecastConfig(task_type="SEQ_CLS", init_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    ids = torch.randint(1, 100, (2, 5))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    summary = recast_summary(model)
    assert summary.other_trainable == 32 * 3 + 3
    assert summary.coefficient_bytes < summary.adapter_bytes
    fresh = tiny_bert_classifier(seed=0, num_labels=3).eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def _without_block_axis(folder: Path) -> None:
    """Store every coefficient tensor of one block as ``(K, n)``, as files of one-block adapters once held them."""
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(value.shape[-1] == 1 for value in tensors.values())
    save_file({key: value[..., 0].contiguous() for key, value in tensors.items()}, folder / "adapter_model.safetensors")


def test_config_saved_without_coefficient_blocks_loads_with_one_block(tmp_path, input_ids):
    """A file without ``coefficient_blocks`` in its config and ``(K, n)`` coefficient tensors holds one block per
    module (the default is 2): it loads as one block, with the outputs it was saved with."""
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, coefficient_blocks=1))
    expected = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    _without_block_axis(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["coefficient_blocks"]
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].coefficient_blocks == 1
    torch.testing.assert_close(model_output(loaded, input_ids), expected, atol=0, rtol=0)


def test_coefficients_stored_without_their_block_axis_load_everywhere(tmp_path, input_ids):
    """``(K, n)`` tensors of a one-block adapter load as ``(K, n, 1)`` through ``from_pretrained``, ``load_adapter``,
    ``load_adapters`` and ``hotswap_adapter``, with the outputs they were saved with; for an adapter of two blocks
    the same tensors are refused as misshapen."""
    from peft_recast import hotswap_adapter, load_adapters

    trained = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, coefficient_blocks=1))
    expected = model_output(trained, input_ids)
    trained.save_pretrained(tmp_path / "one")
    _without_block_axis(tmp_path / "one")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "one")
    torch.testing.assert_close(model_output(loaded, input_ids), expected, atol=0, rtol=0)
    assert all(m.recast_coefficients["default"].dim() == 3 for m in loaded.modules() if isinstance(m, RecastLayer))
    loaded.load_adapter(tmp_path / "one", adapter_name="again")
    load_adapters(loaded, [str(tmp_path / "one")], adapter_names=["bulk"])
    for name in ("again", "bulk"):
        loaded.set_adapter(name)
        torch.testing.assert_close(model_output(loaded, input_ids), expected, atol=0, rtol=0)
    fresh = get_peft_model(tiny_bert(), RecastConfig(coefficient_blocks=1))
    hotswap_adapter(fresh, str(tmp_path / "one"))
    torch.testing.assert_close(model_output(fresh, input_ids), expected, atol=0, rtol=0)

    config_path = tmp_path / "one" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "coefficient_blocks": 2}))
    with pytest.raises(ValueError, match=r"have shape \(1, 2\) in the checkpoint but \(1, 2, 2\)"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "one")


class _Wrapper(torch.nn.Module):
    """An application's classifier around a base model, as ``peft-recast train`` builds one."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder


def test_an_adapter_saved_under_a_wrapper_prefix_names_the_prefix_not_another_base(tmp_path):
    """Same weights, keys with ``encoder.`` in front: the error names the prefix in both directions and does not
    say the base model differs."""
    get_peft_model(_Wrapper(tiny_bert()), RecastConfig(target_modules=["query", "value"])).save_pretrained(
        tmp_path / "wrapped")
    get_peft_model(tiny_bert(), RecastConfig()).save_pretrained(tmp_path / "bare")
    for folder, model, message in [
        ("wrapped", tiny_bert(), r"saved from a model that holds this one under 'encoder': the adapter's module keys "
                                 r"are this model's with 'encoder\.' in front"),
        ("bare", _Wrapper(tiny_bert()), r"saved from the model this one wraps under 'encoder': this model's module "
                                        r"keys are the adapter's with 'encoder\.' in front"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            PeftModel.from_pretrained(model, tmp_path / folder)
        assert "does not belong to this base model" not in str(error.value)
        assert not any(isinstance(m, RecastLayer) for m in model.modules())
