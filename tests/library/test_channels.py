"""`RecastConfig.channels` (output rows with coefficients of their own) and `rank_channels` (Taylor importance)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_recast import RecastConfig, add_channels, rank_channels
from peft_recast.channels import channel_importance

from ..helpers import check_mixed_batch
from ..models import model_output, tiny_bert

QUERY0 = "encoder.layer.0.attention.self.query"
VALUE2 = "encoder.layer.2.attention.self.value"
CHANNELS = {QUERY0: [3, 17, 30], VALUE2: [0]}


def _ids(seed=1):
    return torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(seed))


def _layer(model, key, ):
    return model.base_model.model.get_submodule(key)


def test_channels_add_coefficients_per_row_and_keep_the_function():
    config = RecastConfig(init_weights=False, channels=CHANNELS)
    plain = get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).eval()
    torch.manual_seed(0)
    with_channels = get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).eval()
    with_channels.load_state_dict(plain.state_dict())
    before = model_output(plain, _ids())
    # the same random coefficients, then channels: each listed row starts as a copy of its block's coefficients
    layer = _layer(with_channels, QUERY0)
    layer.add_channels("default", CHANNELS[QUERY0])
    assert tuple(layer.recast_coefficients["default"].shape) == (1, 2, 2 + 3)
    torch.testing.assert_close(model_output(with_channels, _ids()), before)
    model = get_peft_model(tiny_bert(), config)
    counts = {key: p.numel() for key, p in model.named_parameters() if p.requires_grad}
    assert sum(counts.values()) == 8 * 4 + 2 * 4  # 8 modules x 2 templates x 2 blocks, 4 rows x 2 templates


def test_a_channel_moves_its_row_only_and_by_the_formula():
    model = get_peft_model(tiny_bert(), RecastConfig(channels=CHANNELS))
    layer = _layer(model, QUERY0)
    with torch.no_grad():
        layer.recast_coefficients["default"][0, :, 2 + 1] = torch.tensor([0.3, -0.2])  # row 17's own coefficients
    delta = layer.get_delta_weight("default")
    changed = (delta.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert changed == [17]
    # the same values as block coefficients of an adapter without channels, read on row 17
    plain = get_peft_model(tiny_bert(), RecastConfig(coefficient_blocks=1))
    plain_layer = _layer(plain, QUERY0)
    with torch.no_grad():
        plain_layer.recast_coefficients["default"][0, :, 0] = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(delta[17], plain_layer.get_delta_weight("default")[17])


def test_channel_gradients_equal_autograd_through_the_weight():
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, channels=CHANNELS))
    layer = _layer(model, QUERY0)
    x = torch.randn(2, 5, layer.in_features)
    out = layer(x)  # the custom backward (AdaptedCall)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    custom = layer.recast_coefficients["default"].grad.clone()
    layer.recast_coefficients["default"].grad = None
    weight = layer._adapted_weight(["default"])  # plain autograd through the rebuilt weight
    out = torch.nn.functional.linear(x, weight, layer.get_base_layer().bias)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    torch.testing.assert_close(custom, layer.recast_coefficients["default"].grad)
    assert custom[..., 2:].abs().min() > 0  # every channel gets a gradient of its own


def test_channels_save_load_merge_and_mixed_batches(tmp_path):
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, channels=CHANNELS)).eval()
    model.add_adapter("other", RecastConfig(init_weights=False))
    ids = _ids()
    expected = model_output(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["channels"]
    assert saved == CHANNELS
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, ids), expected)
    check_mixed_batch(model, ids, expected)
    layer = _layer(model, QUERY0)
    weight = layer.get_base_layer().weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, weight)


def test_bad_channels_are_refused_and_leave_the_model_as_it_was():
    rows = [5, 2]
    user = {QUERY0: rows}
    config = RecastConfig(channels=user)
    assert config.channels == {QUERY0: [2, 5]} and user[QUERY0] is rows and rows == [5, 2]  # caller's dict untouched
    with pytest.raises(ValueError, match="distinct row indices"):
        RecastConfig(channels={QUERY0: [1, 1]})
    with pytest.raises(ValueError, match="map module keys"):
        RecastConfig(channels=[1, 2])
    with pytest.raises(ValueError, match="coefficient_sharing='module'"):
        RecastConfig(channels=CHANNELS, coefficient_sharing="position")
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="does not adapt"):
        get_peft_model(base, RecastConfig(channels={"encoder.layer.0.attention.self.key": [1]}))
    with pytest.raises(ValueError, match="output rows"):
        get_peft_model(base, RecastConfig(channels={QUERY0: [32]}))
    assert not any("recast" in name for name, _ in base.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def _linear_loss(weights):
    """A loss that reads each output channel of the first query through a fixed weight."""
    def loss_fn(model, batch):
        outputs = {}
        handle = _layer(model, QUERY0).register_forward_hook(lambda m, a, out: outputs.setdefault("q", out))
        hidden = model(input_ids=batch).last_hidden_state
        handle.remove()
        return (outputs["q"] * weights).sum() + 0.01 * hidden.square().mean()
    return loss_fn


def test_importance_is_the_first_order_change_of_the_loss():
    model = get_peft_model(tiny_bert(), RecastConfig())
    weights = torch.linspace(-1, 1, 32)
    loss_fn = _linear_loss(weights)
    batches = [_ids(1), _ids(2)]
    scores = channel_importance(model, batches, loss_fn)
    assert model.training  # left in the mode it was in (ranked in eval mode: no dropout)
    model.eval()
    layer = _layer(model, QUERY0)
    for row in (0, 9, 31):  # d/de L(y with channel r scaled by 1 + e) at e = 0, by central differences
        total = 0.0
        for batch in batches:
            values = []
            for eps in (1e-3, -1e-3):
                def scale(module, args, out, eps=eps):
                    out = out.clone()
                    out[..., row] *= 1 + eps
                    return out
                handle = layer.register_forward_hook(scale, prepend=True)
                with torch.no_grad():
                    values.append(loss_fn(model, batch).double().item())
                handle.remove()
            total += abs(values[0] - values[1]) / 2e-3
        assert scores[QUERY0][row].item() == pytest.approx(total, rel=2e-2, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


def test_rank_channels_picks_the_rows_the_loss_reads():
    model = get_peft_model(tiny_bert(), RecastConfig())
    weights = torch.zeros(32)
    weights[[4, 11, 25]] = torch.tensor([5.0, -7.0, 6.0])
    chosen = rank_channels(model, [_ids(1), _ids(2)], num_channels=3, loss_fn=_linear_loss(weights))
    assert chosen == {QUERY0: [4, 11, 25]}
    model.train()
    more = rank_channels(model, [_ids(1)], num_channels=40, loss_fn=_linear_loss(weights))
    assert sum(map(len, more.values())) == 40 and model.training
    config = RecastConfig(channels=more)
    adapted = get_peft_model(tiny_bert(), config)
    assert adapted.get_nb_trainable_parameters()[0] == 8 * 4 + 40 * 2
    with pytest.raises(ValueError, match="positive integer"):
        rank_channels(model, [_ids(1)], num_channels=0)
    with pytest.raises(ValueError, match="output rows in all"):
        rank_channels(model, [_ids(1)], num_channels=10_000, loss_fn=_linear_loss(weights))
    with pytest.raises(ValueError, match="no `loss`"):
        rank_channels(model, [dict(input_ids=_ids(1))], num_channels=1)


def test_add_channels_in_place_keeps_the_function_and_saves_the_rows(tmp_path):
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).eval()
    ids = _ids()
    before = model_output(model, ids)
    config = model.peft_config["default"]
    with pytest.raises(ValueError, match="output rows"):
        add_channels(model, {QUERY0: [1], VALUE2: [99]})
    with pytest.raises(ValueError, match="does not adapt"):
        add_channels(model, {QUERY0: [1], "encoder.layer.1.attention.self.key": [1]})
    assert model.peft_config["default"] is config and _layer(model, QUERY0).recast_coefficients["default"].dim() == 3
    assert tuple(_layer(model, QUERY0).recast_coefficients["default"].shape) == (1, 2, 2)  # untouched by the failures
    add_channels(model, CHANNELS)
    assert config.channels is None and model.peft_config["default"].channels == CHANNELS
    torch.testing.assert_close(model_output(model, ids), before)
    assert tuple(_layer(model, QUERY0).recast_coefficients["default"].shape) == (1, 2, 5)
    with pytest.raises(ValueError, match="has channels already"):
        add_channels(model, {QUERY0: [1]})
    with torch.no_grad():
        _layer(model, QUERY0).recast_coefficients["default"][..., 3] += 0.5
    after = model_output(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, ids), after)
