"""Many adapters on one model: mixed batches through shared products, the cached adapted weight, templates fitted
once per grouping, training that keeps no adapted weight, task arithmetic, hotswap and torch.compile."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import peft_recast
from peft_recast import RecastConfig, combination, hotswap_adapter
from peft_recast import layer as recast_layer
from peft_recast.layer import RecastLayer

from ..models import tiny_bert, tiny_gpt2


class ConvStack(nn.Module):
    """Four 3x3 convolutions of one shape (stride 1, padding 1), then a mean: a group of Conv2d layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, padding=1)}) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["conv"](x))
        return x


CASES = {
    "linear, 2 row blocks": (tiny_bert, dict(), "ids"),
    "linear, 3 uneven row blocks, 2 sets": (tiny_bert, dict(coefficient_blocks=3, num_coefficient_sets=2), "ids"),
    "linear, replacement form": (tiny_bert, dict(weight_form="replace"), "ids"),
    "linear, fused q/k/v": (tiny_bert, dict(target_modules=["query", "key", "value"],
                                            fused_modules=["query", "key", "value"], coefficient_blocks=1), "ids"),
    "conv1d (gpt-2)": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True), "ids"),
    "conv2d": (ConvStack, dict(target_modules=["conv"], coefficient_blocks=2), "image"),
}


def _inputs(kind: str) -> dict:
    generator = torch.Generator().manual_seed(3)
    if kind == "image":
        return {"x": torch.randn(5, 4, 6, 6, generator=generator)}
    return {"input_ids": torch.randint(1, 100, (5, 7), generator=generator)}


def _output(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    out = model(**inputs, **kwargs)
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def _each_row_alone(model: nn.Module, inputs: dict, names: list[str]) -> torch.Tensor:
    """The output of each row of ``inputs`` through its adapter in ``names`` alone (``"__base__"``: none)."""
    rows = []
    for i, name in enumerate(names):
        row = {key: value[i: i + 1] for key, value in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(_output(model, row))
        else:
            model.set_adapter(name)
            rows.append(_output(model, row))
    return torch.cat(rows)


def _three_adapters(builder, fields: dict) -> nn.Module:
    model = get_peft_model(builder(), RecastConfig(init_weights=False, **fields), adapter_name="u")
    for name in ("v", "w"):
        model.add_adapter(name, RecastConfig(init_weights=False, **fields))
    return model.eval()


@pytest.mark.parametrize("path", ["shared", "rebuild"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mixed_batch_equals_each_row_through_its_own_adapter(case, path, monkeypatch):
    builder, fields, kind = CASES[case]
    model = _three_adapters(builder, fields)
    inputs = _inputs(kind)
    names = ["v", "__base__", "u", "w", "v"]
    calls = []
    original = combination.shared_products
    monkeypatch.setattr(recast_layer, "shared_products", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(combination, "REBUILD_TOKENS_PER_MEMBER", 10**9 if path == "shared" else 0)
    with torch.no_grad():
        mixed = _output(model, inputs, adapter_names=names)
        rows = _each_row_alone(model, inputs, names)
    assert (len(calls) > 0) == (path == "shared")
    torch.testing.assert_close(mixed, rows, rtol=1e-5, atol=1e-5)


def test_the_measured_rule_shares_products_for_many_adapters_and_rebuilds_for_one():
    model = _three_adapters(tiny_bert, {})
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    operation = combination.Operation("linear")
    many_tokens = torch.zeros(4, 512, 32)  # 2,048 tokens
    assert not layer._prefers_shared_products(["u"], many_tokens, operation)
    assert not layer._prefers_shared_products(["u", "v", "w"], many_tokens, operation)
    assert layer._prefers_shared_products(["u", "v"], torch.zeros(2, 8, 32), operation)
    assert layer._prefers_shared_products(["u"] * 41, many_tokens, operation)  # 41 x 25 x 2 >= 2,048


def test_the_adapted_weight_is_cached_and_never_served_stale(tmp_path):
    model = _three_adapters(tiny_bert, {})
    inputs = _inputs("ids")
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    coefficients = layer.recast_coefficients["u"]

    def fresh() -> torch.Tensor:  # the output with every cache dropped
        for module in model.modules():
            if isinstance(module, RecastLayer):
                module._weight_cache = None
        return _output(model, inputs)

    with torch.no_grad():
        model.set_adapter("u")
        first = _output(model, inputs)
        cached = layer._weight_cache[-1]
        assert torch.equal(_output(model, inputs), first) and layer._weight_cache[-1] is cached  # served again
        coefficients.add_(0.5)  # in place
        assert torch.equal(_output(model, inputs), fresh()) and not torch.equal(fresh(), first)
        coefficients.data.mul_(-1)  # through .data: no version counter moves
        torch.testing.assert_close(_output(model, inputs), fresh(), rtol=0, atol=0)
        model.set_adapter("v")  # another active adapter
        assert torch.equal(_output(model, inputs), fresh())
    model.set_adapter("u")
    optimizer = torch.optim.AdamW([coefficients], lr=0.1)
    model(**inputs).last_hidden_state.pow(2).mean().backward()
    optimizer.step()  # through the optimizer
    with torch.no_grad():
        assert torch.equal(_output(model, inputs), fresh())
        state = {k: v + 1 if "recast_coefficients" in k else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # through load_state_dict
        assert torch.equal(_output(model, inputs), fresh())
        model.merge_adapter()
        merged = _output(model, inputs)
        model.unmerge_adapter()
        torch.testing.assert_close(_output(model, inputs), merged, rtol=1e-5, atol=1e-5)
        assert torch.equal(_output(model, inputs), fresh())



def test_a_mixed_batch_serves_its_stacked_mixes_again_and_never_stale(monkeypatch):
    monkeypatch.setattr(combination, "REBUILD_TOKENS_PER_MEMBER", 10**9)  # always the shared products
    model = _three_adapters(tiny_bert, {})
    inputs, names = _inputs("ids"), ["v", "__base__", "u", "w", "v"]
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    coefficients = layer.recast_coefficients["u"]
    mixes = []
    original = layer._mix
    monkeypatch.setattr(layer, "_mix", lambda adapter: mixes.append(adapter) or original(adapter))

    def fresh() -> torch.Tensor:  # every cache dropped
        for module in model.modules():
            if isinstance(module, RecastLayer):
                module._weight_cache = module._mix_cache = None
        return _output(model, inputs, adapter_names=names)

    with torch.no_grad():
        first = _output(model, inputs, adapter_names=names)
        assert sorted(mixes) == ["u", "v", "w"] and layer._mix_cache[-1].shape[0] == 4  # 3 adapters, then no adapter
        stacked = layer._mix_cache[-1]
        mixes.clear()
        assert torch.equal(_output(model, inputs, adapter_names=names), first)
        assert mixes == [] and layer._mix_cache[-1] is stacked  # served again
        coefficients.add_(0.5)  # in place
        assert torch.equal(_output(model, inputs, adapter_names=names), fresh()) and not torch.equal(fresh(), first)
        coefficients.data.mul_(-1)  # through .data: no version counter moves
        assert torch.equal(_output(model, inputs, adapter_names=names), fresh())
        other = ["w", "u"] * 2 + ["__base__"]  # other adapters in other rows
        torch.testing.assert_close(_output(model, inputs, adapter_names=other), _each_row_alone(model, inputs, other),
                                   rtol=1e-5, atol=1e-5)
    # with gradients, nothing is cached: the coefficients of every adapter in the batch receive their gradient
    layer._mix_cache = None
    layer.recast_coefficients["v"].requires_grad_(True)  # "u" is active and trains; "v" too, "w" is frozen
    x = torch.randn(3, 4, 32)
    layer(x, adapter_names=["u", "v", "__base__"]).pow(2).sum().backward()
    assert layer._mix_cache is None
    assert coefficients.grad is not None and coefficients.grad.abs().sum() > 0
    assert layer.recast_coefficients["v"].grad.abs().sum() > 0 and layer.recast_coefficients["w"].grad is None


def test_cached_mixes_and_weights_are_served_only_on_the_device_they_were_built_for():
    model = _three_adapters(tiny_bert, {})
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        on_cpu = layer._stacked_mixes(["u", "v"], torch.device("cpu"))
        assert layer._stacked_mixes(["u", "v"], torch.device("cpu")) is on_cpu
        on_meta = layer._stacked_mixes(["u", "v"], torch.device("meta"))
        assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
        weight = layer._cached_weight(["u"])
        model.to("meta")
        assert layer._cached_weight(["u"]).device.type == "meta" and weight.device.type == "cpu"


def test_an_adapter_with_a_fitted_grouping_reuses_its_fit_and_mixing(monkeypatch):
    model = get_peft_model(tiny_bert(), RecastConfig(), adapter_name="u")
    fits = []
    original = peft_recast.planning.fit_group
    monkeypatch.setattr(peft_recast.planning, "fit_group", lambda *a, **k: fits.append(1) or original(*a, **k))
    model.add_adapter("v", RecastConfig())
    assert fits == []  # every group was fitted for "u" already
    layers = [m for m in model.modules() if isinstance(m, RecastLayer)]
    assert all(m.recast_mixing["u"] is m.recast_mixing["v"] for m in layers)
    model.add_adapter("w", RecastConfig(num_templates=1))  # another grouping: fitted anew
    assert len(fits) == len({m.recast_group["w"].name for m in layers})
    with torch.no_grad():  # a changed base weight is fitted again, never served from the old fit
        layers[0].get_base_layer().weight.mul_(2)
    fits.clear()
    model.add_adapter("d", RecastConfig())
    assert len(fits) == 1


def test_training_keeps_no_adapted_weight_for_backward_and_gradients_match_plain_autograd():
    """Every tensor saved for backward during a RECAST forward is the input, a parameter, a buffer or a few
    coefficient-sized values: none has a weight's size. The coefficient gradients equal those of plain autograd
    through ``F.linear(x, W + sum_j mix_j W_j)``, written out independently here."""
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, coefficient_blocks=3))
    ids = _inputs("ids")["input_ids"]
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    weight_sizes = {m.get_base_layer().weight.numel() for m in model.modules() if isinstance(m, RecastLayer)}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in owned:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
    loss.backward()
    assert saved and weight_sizes.isdisjoint(saved), sorted(set(saved))

    layer = model.base_model.model.encoder.layer[1].attention.self.value

    x = torch.randn(3, 5, 32, requires_grad=True)
    theta = layer.recast_coefficients["default"]
    theta.grad = None
    layer(x).pow(2).sum().backward()
    reference = theta.detach().clone().requires_grad_(True)
    mix = torch.einsum("kn...,nm->m...", reference, layer.recast_mixing["default"]) / reference.shape[0]
    rows = torch.tensor_split(torch.arange(32), 3)
    basis = layer.recast_group["default"].basis()
    adapted = layer.get_base_layer().weight.detach().clone()
    adapted = adapted + sum(torch.cat([mix[j, b] * basis[j][r] for b, r in enumerate(rows)]) for j in range(len(basis)))
    F.linear(x.detach(), adapted, layer.get_base_layer().bias).pow(2).sum().backward()
    torch.testing.assert_close(theta.grad, reference.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "fan_in_fan_out", "conv2d"])
def test_the_recomputing_autograd_function_passes_gradcheck(kind):
    torch.manual_seed(0)
    operation = {
        "linear": combination.Operation("linear"),
        "fan_in_fan_out": combination.Operation("linear", fan_in_fan_out=True),
        "conv2d": combination.Operation("conv2d", padding=(1, 1), stride=(2, 1)),
    }[kind]
    shape, x_shape = {"linear": ((6, 5), (2, 3, 5)), "fan_in_fan_out": ((5, 6), (2, 3, 5)),
                      "conv2d": ((6, 5, 3, 3), (2, 5, 6, 6))}[kind]
    weight = torch.randn(shape, dtype=torch.double)
    basis = [torch.randn(shape, dtype=torch.double) for _ in range(3)]
    blocks = combination.row_blocks(6, 4)  # uneven: 2, 2, 1, 1 rows
    x = torch.randn(x_shape, dtype=torch.double, requires_grad=True)
    mix = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    bias = torch.randn(6, dtype=torch.double, requires_grad=True)
    subtract = torch.randn(shape, dtype=torch.double)

    def call(x, mix, bias):
        return combination.AdaptedCall.apply(x, weight, bias, operation, ((3, True),), torch.double, mix, blocks,
                                             *basis, subtract)

    assert torch.autograd.gradcheck(call, (x, mix, bias))


def test_add_weighted_adapter_is_the_weighted_sum_of_updates_exactly():
    model = _three_adapters(tiny_bert, dict(num_coefficient_sets=2))
    model.add_weighted_adapter(["u", "v", "w"], [0.5, -1.5, 2.0], "combined")
    layers = [m for m in model.modules() if isinstance(m, RecastLayer)]
    for layer in layers:
        expected = sum(w * layer.get_delta_weight(n) for n, w in zip("uvw", (0.5, -1.5, 2.0)))
        torch.testing.assert_close(layer.get_delta_weight("combined"), expected, rtol=1e-5, atol=1e-7)
    inputs = _inputs("ids")
    with torch.no_grad():
        model.set_adapter("combined")
        combined = _output(model, inputs)
        updates = [sum(w * layer.get_delta_weight(n) for n, w in zip("uvw", (0.5, -1.5, 2.0))) for layer in layers]
        for layer, update in zip(layers, updates):  # after all are computed: the bases are the pretrained weights
            layer.set_base_weight(layer.get_base_weight() + update)
        with model.disable_adapter():
            torch.testing.assert_close(_output(model, inputs), combined, rtol=1e-4, atol=1e-5)


def test_add_weighted_adapter_refuses_what_does_not_add_up_and_changes_nothing():
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False), adapter_name="u")
    model.add_adapter("other", RecastConfig(num_templates=1))
    model.add_adapter("replaced", RecastConfig(weight_form="replace"))
    modules = [(name, type(m)) for name, m in model.named_modules()]
    for adapters, weights, message in [
        (["u", "other"], [1, 1], "`num_templates` is 2 for one and 1 for the other"),
        (["replaced"], [1], "replacement form"),
        (["u", "missing"], [1, 1], "do not exist"),
        (["u"], [1, 2], "one weight per adapter"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.add_weighted_adapter(adapters, weights, "new")
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["u"], [1], "other")
    with pytest.raises(ValueError, match="combination_type='linear'; got 'svd'"):
        model.base_model.add_weighted_adapter(["u"], [1], "new", combination_type="svd")
    assert sorted(model.peft_config) == ["other", "replaced", "u"]
    assert [(name, type(m)) for name, m in model.named_modules()] == modules


def test_hotswap_replaces_coefficients_in_place_and_equals_loading(tmp_path):
    base = tiny_bert()
    source = get_peft_model(copy.deepcopy(base), RecastConfig(init_weights=False), adapter_name="x")
    source.add_adapter("y", RecastConfig(init_weights=False))
    source.save_pretrained(str(tmp_path), selected_adapters=["x", "y"])
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "x")).eval()
    tensors = {name: p for name, p in model.named_parameters()}
    inputs = _inputs("ids")
    with torch.no_grad():
        _output(model, inputs)  # a cached weight of x
        hotswap_adapter(model, str(tmp_path / "y"))
        swapped = _output(model, inputs)
        loaded = _output(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "y")).eval(), inputs)
    assert torch.equal(swapped, loaded)
    assert all(tensors[name] is p for name, p in model.named_parameters())


def test_hotswap_refuses_another_grouping_or_base_and_changes_nothing(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), RecastConfig(init_weights=False))
    get_peft_model(copy.deepcopy(base), RecastConfig(num_templates=1)).save_pretrained(str(tmp_path / "grouping"))
    get_peft_model(tiny_bert(seed=7), RecastConfig()).save_pretrained(str(tmp_path / "base"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for folder, message in [("grouping", "`num_templates` is 1 in the file but 2"), ("base", "another base model")]:
        with pytest.raises(ValueError, match=message):
            hotswap_adapter(model, str(tmp_path / folder))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="No adapter 'other' is loaded"):
        hotswap_adapter(model, str(tmp_path / "grouping"), adapter_name="other")


@pytest.mark.parametrize("path", ["train", "eval cached", "mixed shared", "mixed rebuild"])
def test_torch_compile_traces_every_path_without_a_graph_break(path, monkeypatch):
    import torch._dynamo

    model = _three_adapters(lambda: tiny_bert(layers=2), dict(layers_per_group=2))
    inner, ids = model.base_model.model, _inputs("ids")["input_ids"]
    torch._dynamo.reset()
    if path == "train":
        model.set_adapter("u")
        explained = torch._dynamo.explain(lambda i: inner(input_ids=i).last_hidden_state.sum())(ids)
    elif path == "eval cached":
        with torch.no_grad():
            explained = torch._dynamo.explain(lambda i: inner(input_ids=i).last_hidden_state)(ids)
    else:
        monkeypatch.setattr(combination, "REBUILD_TOKENS_PER_MEMBER", 10**9 if path == "mixed shared" else 0)
        layer = inner.encoder.layer[0].attention.self.query
        with torch.no_grad():
            explained = torch._dynamo.explain(lambda x: layer(x, adapter_names=["u", "v", "__base__"]))(
                torch.randn(3, 4, 32))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_load_adapters_in_bulk_equals_loading_one_by_one_and_fails_clean(tmp_path):
    base = tiny_bert()
    source = get_peft_model(copy.deepcopy(base), RecastConfig(init_weights=False), adapter_name="t0")
    for i in range(1, 4):
        source.add_adapter(f"t{i}", RecastConfig(init_weights=False))
    source.save_pretrained(str(tmp_path), selected_adapters=[f"t{i}" for i in range(4)])
    get_peft_model(tiny_bert(seed=7), RecastConfig()).save_pretrained(str(tmp_path / "foreign"))
    bulk = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "t0"), adapter_name="t0").eval()
    assert peft_recast.load_adapters(bulk, [str(tmp_path / f"t{i}") for i in range(1, 4)]) == ["t1", "t2", "t3"]
    single = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "t0"), adapter_name="t0").eval()
    for i in range(1, 4):
        single.load_adapter(str(tmp_path / f"t{i}"), adapter_name=f"t{i}")
    inputs, names = _inputs("ids"), ["t0", "t1", "t2", "t3", "t1"]
    with torch.no_grad():
        torch.testing.assert_close(_output(bulk, inputs, adapter_names=names), _output(single, inputs, adapter_names=names),
                                   rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in bulk.named_parameters() if "recast_coefficients" in n)
    modules = [(name, type(m)) for name, m in bulk.named_modules()]
    with pytest.raises(ValueError, match="does not belong to this base model"):
        peft_recast.load_adapters(bulk, [str(tmp_path / "t1"), str(tmp_path / "foreign")], ["again", "foreign"])
    assert sorted(bulk.peft_config) == ["t0", "t1", "t2", "t3"]
    assert [(name, type(m)) for name, m in bulk.named_modules()] == modules
    with pytest.raises(ValueError, match="are in use"):
        peft_recast.load_adapters(bulk, [str(tmp_path / "t1")])


def test_an_adapter_trained_with_the_recomputing_function_matches_plain_autograd(monkeypatch):
    """Ten AdamW steps through ``AdaptedCall`` end where ten steps of plain autograd through the adapted weight end
    (the path used before it existed), to float tolerance: adapters trained before and after are compatible."""
    ids = _inputs("ids")["input_ids"]

    def trained() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, coefficient_blocks=3)).eval()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(10):
            model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    recomputed = trained()
    monkeypatch.setattr(recast_layer.Linear, "_adapted_forward",
                        lambda self, x, adapters: self._call_base(x, self._adapted_weight(adapters)))
    plain = trained()
    assert recomputed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_ten_thousand_adapters_load_in_bulk_and_one_mixed_batch_over_all_equals_each_alone(tmp_path):
    """10,000 saved adapters on one model: ``load_adapters`` adds them all, each with its own coefficients beside the
    first one's templates and mixing, and one call of 10,000 rows, each through its own adapter, gives every sampled
    row (300, seeded) as a model holding that adapter alone does. (MiniLM-L6: tests/apps/test_serving_bench.py and
    ``peft-recast bench --serving --serving-scale 10000``.)"""
    count, base = 10_000, tiny_bert()
    get_peft_model(copy.deepcopy(base), RecastConfig(init_weights=False), adapter_name="a0").save_pretrained(
        str(tmp_path))
    first = tmp_path / "a0"
    config, saved = (first / "adapter_config.json").read_bytes(), (first / "adapter_model.safetensors").read_bytes()
    header = 8 + int.from_bytes(saved[:8], "little")  # then the header (JSON), then the float32 coefficients
    values = 0.1 * torch.randn(count, (len(saved) - header) // 4, generator=torch.Generator().manual_seed(0))
    names = [f"a{i}" for i in range(count)]
    for i in range(1, count):  # what save_pretrained writes for adapters of one config, with other coefficients
        (tmp_path / names[i]).mkdir()
        (tmp_path / names[i] / "adapter_config.json").write_bytes(config)
        (tmp_path / names[i] / "adapter_model.safetensors").write_bytes(saved[:header] + values[i].numpy().tobytes())
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(first), adapter_name="a0").eval()
    assert peft_recast.load_adapters(model, [str(tmp_path / name) for name in names[1:]]) == names[1:]
    layers = [m for m in model.modules() if isinstance(m, RecastLayer)]
    assert layers and all(len(layer.recast_coefficients) == count for layer in layers)
    assert all(layer.recast_group[name] is layer.recast_group["a0"] and layer.recast_mixing[name] is
               layer.recast_mixing["a0"] for layer in layers for name in names[::97])
    ids = torch.randint(1, 100, (count, 4), generator=torch.Generator().manual_seed(1))
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(first)).eval()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).last_hidden_state
        for i in sorted(random.Random(0).sample(range(count), 300)):
            hotswap_adapter(reference, str(tmp_path / names[i]))
            alone = reference(input_ids=ids[i: i + 1]).last_hidden_state[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
            with reference.disable_adapter():  # the adapter moves its row: equality says something
                assert (reference(input_ids=ids[i: i + 1]).last_hidden_state[0] - alone).abs().max() > 1e-3
