"""``save_adapters``: many adapters saved as ``save_pretrained(selected_adapters=...)`` saves them, file for file."""

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_recast
from peft_recast import RecastConfig

from ..models import tiny_bert, tiny_bert_classifier, tiny_llama

# (base model, config fields of every adapter, of the first only): a head trained per adapter (modules_to_save),
# biases (PEFT allows them on one adapter of a model), shared coefficients, new token embeddings of a decoder
CASES = {
    "head per adapter": (tiny_bert_classifier, dict(task_type="SEQ_CLS"), {}),
    "biases": (tiny_bert, {}, dict(bias="all")),
    "biases of the adapted layers": (tiny_bert, {}, dict(bias="recast_only")),
    "coefficients shared by position": (tiny_bert, dict(coefficient_sharing="position"), {}),
    "trainable tokens, decoder": (tiny_llama, dict(task_type="CAUSAL_LM", trainable_token_indices=[3, 5]), {}),
}
NAMES = ["task1", "task2", "task3"]


def _files(folder: str) -> dict[str, object]:
    """Every file under ``folder`` by relative path: tensors of safetensors files, parsed JSON, else the text."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if name.endswith(".safetensors"):
                found[key] = load_file(path)
            elif name.endswith(".json"):
                with open(path) as handle:
                    found[key] = json.load(handle)
            else:
                with open(path) as handle:
                    found[key] = handle.read()
    return found


def _assert_same_files(first: str, second: str) -> None:
    ours, theirs = _files(first), _files(second)
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        if isinstance(value, dict) and key.endswith(".safetensors"):
            assert sorted(value) == sorted(theirs[key]), key
            for name, tensor in value.items():
                assert tensor.equal(theirs[key][name]), (key, name)
        else:
            assert value == theirs[key], key


def _model(builder, fields: dict, names: list[str], first: dict = {}):
    model = get_peft_model(builder(), RecastConfig(init_weights=False, **fields, **first))
    for name in names:
        model.add_adapter(name, RecastConfig(init_weights=False, **fields))
    for index, (key, parameter) in enumerate(sorted(model.named_parameters())):
        if parameter.requires_grad or "modules_to_save" in key or "trainable_tokens" in key:
            parameter.data.normal_(generator=torch.Generator().manual_seed(index))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_adapters_writes_what_save_pretrained_writes(case, tmp_path):
    builder, fields, first = CASES[case]
    model = _model(builder, fields, NAMES, first)
    names = ["default", "task1", "task3"]
    folders = peft_recast.save_adapters(model, str(tmp_path / "ours"), names)
    assert folders == [str(tmp_path / "ours"), str(tmp_path / "ours" / "task1"), str(tmp_path / "ours" / "task3")]
    model.save_pretrained(str(tmp_path / "peft"), selected_adapters=names)
    _assert_same_files(str(tmp_path / "ours"), str(tmp_path / "peft"))
    reloaded = PeftModel.from_pretrained(builder(), folders[0])
    assert peft_recast.load_adapters(reloaded, folders[1:]) == ["task1", "task3"]


def test_save_adapters_saves_every_adapter_by_default_and_passes_options_on(tmp_path):
    model = _model(tiny_llama, dict(task_type="CAUSAL_LM"), ["user-1", "user-2"])
    assert peft_recast.save_adapters(model, str(tmp_path / "ours"), save_embedding_layers=True) == [
        str(tmp_path / "ours"), str(tmp_path / "ours" / "user-1"), str(tmp_path / "ours" / "user-2")]
    model.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=True)
    _assert_same_files(str(tmp_path / "ours"), str(tmp_path / "peft"))
    assert "base_model.model.model.embed_tokens.weight" in load_file(str(tmp_path / "ours" / "user-1" /
                                                                         "adapter_model.safetensors"))


def test_save_adapters_refuses_unknown_or_repeated_names_and_writes_nothing(tmp_path):
    model = _model(tiny_bert, {}, ["task1"])
    with pytest.raises(ValueError, match=r"Cannot save adapter\(s\) \['task2'\]: this model holds \['default', 'task1'\]"):
        peft_recast.save_adapters(model, str(tmp_path / "out"), ["task1", "task2"])
    with pytest.raises(ValueError, match="Pass each adapter name once"):
        peft_recast.save_adapters(model, str(tmp_path / "out"), ["task1", "task1"])
    assert not (tmp_path / "out").exists()
