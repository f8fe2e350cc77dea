"""``benchmarks/layer_choice.py``: ranking modules by their update and zeroing the others, then restoring them."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_recast import RecastConfig
from peft_recast.apps import bench
from peft_recast.apps.encoder import new_head
from peft_recast.apps.tasks import TaskData
from peft_recast.layer import RecastLayer

from ..helpers import TokenBatches
from ..models import tiny_bert

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "layer_choice.py"


def _layer_choice():
    spec = importlib.util.spec_from_file_location("layer_choice", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keeping_all_none_or_some_modules_matches_the_adapter_the_base_and_restores_the_coefficients():
    layer_choice = _layer_choice()
    torch.manual_seed(0)
    encoder = get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).eval()
    with torch.no_grad():  # a strong adapter, so that it changes predictions of the random head
        for name, parameter in encoder.named_parameters():
            if "recast_coefficients" in name:
                parameter.mul_(20)
    head = new_head(32, 3, 0, torch.device("cpu"))
    texts = TokenBatches(32)
    adapted = bench.predictions(encoder, head, texts, 8, "test")
    data = TaskData("tiny", ["a", "b", "c"], texts, texts, texts, adapted, adapted, adapted)  # labels: the adapter's
    with encoder.disable_adapter():
        base_agreement = (bench.predictions(encoder, head, texts, 8, "test") == adapted).float().mean().item()
    assert base_agreement < 1.0  # the adapter changes some predictions: the check below can tell them apart
    before = {name: p.detach().clone() for name, p in encoder.named_parameters() if p.requires_grad}

    changes = layer_choice.relative_changes(encoder)
    merged = copy.deepcopy(encoder)  # ||delta_W|| / ||W|| again, from the weights a merge writes
    merged.merge_adapter()
    expected = {name: ((merged.get_submodule(name).get_base_layer().weight - module.get_base_layer().weight).norm()
                       / module.get_base_layer().weight.norm()).item()
                for name, module in encoder.named_modules() if isinstance(module, RecastLayer)}
    assert len(changes) == 8  # q, v of 4 layers
    assert changes == pytest.approx(expected, rel=1e-4)
    assert layer_choice.accuracy_keeping(encoder, head, data, set(changes), 8) == 1.0
    assert layer_choice.accuracy_keeping(encoder, head, data, set(), 8) == base_agreement
    largest = max(changes, key=changes.get)
    only_largest = copy.deepcopy(encoder)  # the same choice made by hand on a copy
    with torch.no_grad():
        for name, module in only_largest.named_modules():
            if isinstance(module, RecastLayer) and name != largest:
                module.recast_coefficients["default"].zero_()
    expected = (bench.predictions(only_largest, head, texts, 8, "test") == adapted).float().mean().item()
    assert layer_choice.accuracy_keeping(encoder, head, data, {largest}, 8) == expected
    assert all(torch.equal(p, before[name]) for name, p in encoder.named_parameters() if p.requires_grad)
