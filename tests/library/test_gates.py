"""TAPS gates (`RecastConfig.module_gates`): 0/1 per module with a straight-through gradient, the sparsity penalty as a
gradient, and `prune_gates` (an adapter that saves, loads and counts only its open modules)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_recast import RecastConfig, prune_gates
from peft_recast.pruning import gate_states

from ..helpers import check_mixed_batch
from ..models import model_output, tiny_bert

VALUE3 = "encoder.layer.3.attention.self.value"
QUERY1 = "encoder.layer.1.attention.self.query"


def _ids(seed=1):
    return torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(seed))


def _layer(model, key):
    return model.base_model.model.get_submodule(key)


def _scores(model):
    return {n: p for n, p in model.named_parameters() if "recast_gate_scores" in n}


def _gated_and_plain(**gates):
    gated = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, module_gates=True, **gates)).eval()
    plain = get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).eval()
    coefficients = {n: p for n, p in gated.named_parameters() if "recast_coefficients" in n}
    with torch.no_grad():
        for name, parameter in plain.named_parameters():
            if "recast_coefficients" in name:
                parameter.copy_(coefficients[name])
    return gated, plain


def test_an_open_gate_is_the_plain_adapter_and_a_closed_one_the_pretrained_layer():
    gated, plain = _gated_and_plain()
    ids = _ids()
    torch.testing.assert_close(model_output(gated, ids), model_output(plain, ids))
    assert set(gate_states(gated).values()) == {True} and len(gate_states(gated)) == 8
    with torch.no_grad():
        for parameter in _scores(gated).values():
            parameter.fill_(0.05)  # below the threshold 0.1: every module closed
        bare = gated.get_base_model()
    with gated.disable_adapter():
        expected = model_output(gated, ids)
    torch.testing.assert_close(model_output(gated, ids), expected)  # the weight cache saw the scores change
    assert bare is not None and set(gate_states(gated).values()) == {False}


def test_straight_through_gradient_and_the_penalty_after_warmup():
    gated, _ = _gated_and_plain(gate_penalty=0.4, gate_warmup_steps=1)
    gated.train()
    layer = _layer(gated, QUERY1)
    x = torch.randn(2, 5, layer.in_features)
    weights = torch.randn(2, 5, layer.out_features)
    score, theta = layer.recast_gate_scores["default"], layer.recast_coefficients["default"]
    (layer(x) * weights).sum().backward()  # warm-up pass: no penalty
    # d/dc L(c delta_W) at c = 1 is sum(theta * dL/dtheta): delta_W is linear in theta
    torch.testing.assert_close(score.grad[0], (theta * theta.grad).sum())
    first = score.grad.clone()
    score.grad = None
    theta.grad = None
    (layer(x) * weights).sum().backward()  # warm: the penalty's gradient, 0.4 / 8 gated modules, joins
    torch.testing.assert_close(score.grad, first + 0.4 / 8)


def _train_gates_closed(model, closed=(VALUE3, QUERY1)):
    """Push two scores below the threshold with the penalty alone (coefficients frozen at their random values)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "recast_gate_scores" in name and any(key in name for key in closed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for _ in range(3):
        (model_output(model, _ids()) * 0).sum().backward()  # no task gradient: the penalty alone moves the scores
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_penalty_closes_gates_and_pruning_keeps_the_function_and_saves_open_modules_only(tmp_path):
    gated, _ = _gated_and_plain(gate_penalty=0.4)
    other_base = tiny_bert(seed=1)
    _train_gates_closed(gated)
    states = gate_states(gated)
    assert [key for key, is_open in states.items() if not is_open] == [QUERY1, VALUE3]
    ids = _ids()
    before = model_output(gated, ids)
    config_before = gated.peft_config["default"]
    assert prune_gates(gated) == [QUERY1, VALUE3]
    assert not config_before.inactive_modules  # the old config object is not mutated, a new one replaces it
    config = gated.peft_config["default"]
    assert config.inactive_modules == [QUERY1, VALUE3] and not config.module_gates
    torch.testing.assert_close(model_output(gated, ids), before)
    gated.requires_grad_(False)
    for name, parameter in gated.named_parameters():
        parameter.requires_grad = "recast_coefficients" in name
    assert gated.get_nb_trainable_parameters()[0] == 6 * 4  # 6 open modules x 2 templates x 2 blocks
    gated.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 6 and not any("gate" in key or "layer.3.attention.self.value" in key for key in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inactive_modules"] == [QUERY1, VALUE3]
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, ids), before)
    assert loaded.get_nb_trainable_parameters()[0] == 0 and sum(
        p.numel() for n, p in loaded.named_parameters() if "recast_" in n) == 24
    # the closed modules' weights still span their groups' templates: a foreign base is refused as before
    with pytest.raises(ValueError, match="does not belong to this base model"):
        PeftModel.from_pretrained(other_base, tmp_path)
    # mixed batches, merge and unmerge, another adapter next to it
    loaded.add_adapter("other", RecastConfig(init_weights=False))
    check_mixed_batch(loaded, ids, before)
    weight = _layer(loaded, QUERY1).get_base_layer().weight.clone()
    loaded.merge_adapter()
    torch.testing.assert_close(model_output(loaded, ids), before, atol=1e-5, rtol=1e-4)
    assert torch.equal(_layer(loaded, QUERY1).get_base_layer().weight, weight)  # inactive: nothing merged
    loaded.unmerge_adapter()
    loaded.delete_adapter("other")
    torch.testing.assert_close(model_output(loaded, ids), before)


def test_an_unpruned_gated_adapter_saves_and_loads_its_scores(tmp_path):
    gated, _ = _gated_and_plain(gate_penalty=0.4)
    _train_gates_closed(gated, closed=(VALUE3,))
    ids = _ids()
    before = model_output(gated, ids)
    gated.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, ids), before)
    assert gate_states(loaded) == gate_states(gated)
    state = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "gate" not in k or "layer.0" not in k}, tmp_path / "adapter_model.safetensors")
    base = tiny_bert()
    with pytest.raises(ValueError, match="lacks the gate scores of 2 targeted module"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any("recast" in name for name, _ in base.named_modules())  # removed again
    save_file({k: v.expand(2).clone() if "gate" in k else v for k, v in state.items()},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"gate scores .* have shape \(2,\) in the checkpoint but \(1,\) \(one score "
                                         r"per gated module\)"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_gate_errors_are_clear_and_change_nothing(tmp_path):
    for bad in (dict(gate_penalty=-1.0), dict(gate_threshold=float("nan")), dict(gate_warmup_steps=1.5),
                dict(module_gates=True, coefficient_sharing="position"), dict(inactive_modules="x")):
        with pytest.raises(ValueError):
            RecastConfig(**bad)
    plain = get_peft_model(tiny_bert(), RecastConfig())
    with pytest.raises(ValueError, match="has no gates to prune"):
        prune_gates(plain)
    gated, _ = _gated_and_plain()
    with torch.no_grad():
        for parameter in _scores(gated).values():
            parameter.fill_(-1.0)
    with pytest.raises(ValueError, match="Every gate .* is closed"):
        prune_gates(gated)
    assert len(_scores(gated)) == 8 and gated.peft_config["default"].module_gates  # unchanged
    gated.add_adapter("b", RecastConfig(module_gates=True))
    with pytest.raises(ValueError, match="prune_gates on each adapter first"):
        gated.base_model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "sum")
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="does not adapt"):
        get_peft_model(base, RecastConfig(inactive_modules=["encoder.layer.0.attention.self.key"]))
    assert not any("recast" in name for name, _ in base.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_a_pruned_adapter_loads_again_beside_one_with_the_same_closed_modules(tmp_path):
    """The second adapter of a pruned grouping takes the fast path (the first one's groups and mixing): it gets
    coefficients on the open modules only and computes what the first one does."""
    gated, _ = _gated_and_plain(gate_penalty=0.4)
    _train_gates_closed(gated)
    prune_gates(gated)
    gated.save_pretrained(tmp_path)
    ids = _ids()
    before = model_output(gated.eval(), ids)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    loaded.load_adapter(str(tmp_path), adapter_name="again")
    for key in (QUERY1, VALUE3):
        assert "again" not in _layer(loaded, key).recast_coefficients and "again" in _layer(loaded, key).recast_group
    loaded.set_adapter("again")
    torch.testing.assert_close(model_output(loaded, ids), before)
    mixed = model_output(loaded, ids, adapter_names=["again", "default", "again"])
    torch.testing.assert_close(mixed, before)
