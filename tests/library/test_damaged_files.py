"""Damaged and hostile adapter files: a clear ``ValueError`` every time, the model and the folder left as they were."""

import copy
import json
import random
import struct

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer

from ..models import tiny_bert

NAN = float("nan")
# Values of the wrong type or range for each field of a RECAST adapter_config.json.
WRONG = {
    "target_modules": [1, 1.5, [1, "a"], {"a": 1}, True],
    "exclude_modules": [1, [1]],
    "layers_to_transform": [1.5, "x", [1.5], [-1]],
    "layers_pattern": [1, [1]],
    "modules_to_save": ["x", 1, [1]],
    "fused_modules": [1, [1, "a"]],
    "inactive_modules": [1, [1]],
    "preset": [[], 1, "no-such-preset"],
    "template_bank": [1.5, []],
    "base_fingerprint": [1, [1, "a"], {"g": ["a"]}, {"g": [NAN]}],
    "trainable_token_indices": ["x", [], [1.5]],
    "init_weights": ["x", 1, None],
    "fan_in_fan_out": ["x", None],
    "module_gates": [1, None],
    "share_across_module_types": ["yes"],
    "inference_mode": [None, "x"],
    "num_templates": [None, 0, 1.5, "2", True, 10**30],
    "num_coefficient_sets": [None, 0, 10**30],
    "coefficient_blocks": [None, -2, "2"],
    "layers_per_group": [0, 1.5, "2"],
    "coefficient_scale": [None, 0, -1, "10", True, 10**30, NAN],
    "coefficient_bound": [0, "x", NAN],
    "coefficient_sharing": ["x", 1],
    "weight_form": ["x", []],
    "bias": ["x", 1],
    "channels": [1, {"a": "x"}, {"a": [-1]}],
    "gate_init": ["x", NAN, None],
    "gate_threshold": ["x", NAN],
    "gate_penalty": [-1, None],
    "gate_warmup_steps": [-1, 1.5],
    "recast_version": ["not a version"],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).save_pretrained(folder)
    return json.loads((folder / "adapter_config.json").read_text()), (folder / "adapter_model.safetensors").read_bytes()


def _refused(folder, config, weights) -> str:
    """Write the files, load them, and return the error; assert nothing changed."""
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    base = tiny_bert()
    state = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(module, RecastLayer) for module in base.modules())
    after = base.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(value, state[key]) for key, value in after.items())
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == files
    return str(error.value)


@pytest.mark.parametrize("name", sorted(WRONG))
def test_a_field_of_the_wrong_type_or_range_is_refused_by_name(saved, tmp_path, name):
    config, weights = saved
    assert name in config  # every field the test edits is one a saved adapter holds
    for value in WRONG[name]:
        message = _refused(tmp_path / "case", {**copy.deepcopy(config), name: value}, weights)
        assert f"`{name}" in message, (value, message)


def test_damaged_weight_files_are_refused_before_the_model_is_touched(saved, tmp_path):
    config, weights = saved
    size = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + size])
    first = sorted(key for key in header if key != "__metadata__")[0]

    def with_header(changed):
        encoded = json.dumps(changed).encode()
        return struct.pack("<Q", len(encoded)) + encoded + weights[8 + size :]

    cases = {f"truncated to {n} bytes": weights[:n] for n in (0, 4, 8, 20, len(weights) // 2, len(weights) - 1)}
    cases["a declared header of 1e15 bytes"] = struct.pack("<Q", 10**15) + weights[8:]
    for dtype in ("F64", "I64", "BOOL", "F16", "U8"):
        cases[f"dtype {dtype}"] = with_header({**header, first: {**header[first], "dtype": dtype}})
    cases["a shape of 1e12 numbers"] = with_header({**header, first: {**header[first], "shape": [10**6, 10**6]}})
    cases["offsets past the end"] = with_header({**header, first: {**header[first], "data_offsets": [0, 10**12]}})
    tensors = load_file_bytes(weights, tmp_path)
    for value in (float("nan"), float("inf"), -float("inf")):
        poisoned = {key: tensor.clone() for key, tensor in tensors.items()}
        poisoned[first].view(-1)[0] = value
        save_file(poisoned, tmp_path / "poisoned.safetensors")
        cases[f"a coefficient {value}"] = (tmp_path / "poisoned.safetensors").read_bytes()
    cases["an integer coefficient tensor"] = _saved_bytes({**tensors, first: tensors[first].long()}, tmp_path)
    cases["a tensor of another shape"] = _saved_bytes({**tensors, first: torch.zeros(3, 3)}, tmp_path)
    cases["an unknown tensor"] = _saved_bytes({**tensors, "base_model.model.pooler.recast_coefficients":
                                              torch.zeros(1, 2, 2)}, tmp_path)
    rng = random.Random(0)
    for _ in range(60):
        flipped = bytearray(weights)
        flipped[rng.randrange(8, 8 + size)] ^= 1 << rng.randrange(8)  # within the header: every flip breaks it
        cases[f"a flipped header bit {len(cases)}"] = bytes(flipped)
    refused = {label: _refused(tmp_path / "case", config, data) for label, data in cases.items()}
    assert len(refused) == len(cases) >= 80


def load_file_bytes(data: bytes, folder):
    (folder / "read.safetensors").write_bytes(data)
    return load_file(folder / "read.safetensors")


def _saved_bytes(tensors, folder) -> bytes:
    save_file(tensors, folder / "edited.safetensors")
    return (folder / "edited.safetensors").read_bytes()
