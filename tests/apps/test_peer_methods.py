"""The benchmark's tiny-budget peers (TinyLoRA tied and untied, UniLoRA, WaveFT, FourierFT): each trains exactly the
count in its name on all-MiniLM-L6-v2, and each has a learning-rate grid of at least five rates around its default.
Whether the rate validation chose lies inside the rates that ran is checked on the shipped records
(tests/apps/test_one_rate.py)."""

import copy
import re
import warnings

import pytest
import torch

from peft_recast.apps.bench.methods import FAMILIES, LADDER_SIZES, METHODS, PEER_METHODS

# the counts of the RECAST rungs every peer but FourierFT (which runs at every rung) runs at
PEER_SIZES = (24, 48, 144, 216, 648)

NEW_PEERS = [f"{peer}-{size}" for peer in ("tinylora-tied", "tinylora", "unilora", "waveft") for size in PEER_SIZES]


def _count(name: str) -> int:
    return int(re.search(r"-(\d+)$", name).group(1))


@pytest.fixture(scope="module")
def encoder():
    from peft_recast.apps.encoder import load_encoder

    return load_encoder(torch.device("cpu"))


def test_peer_methods_cover_every_peer_at_every_rung():
    assert set(NEW_PEERS) <= set(PEER_METHODS)
    assert {f"fourierft-{size}" for size in LADDER_SIZES} <= set(PEER_METHODS)
    assert len(PEER_METHODS) == len(set(PEER_METHODS)) == len(NEW_PEERS) + len(LADDER_SIZES)
    assert all(name in METHODS and METHODS[name].kind == "peft" for name in PEER_METHODS)
    assert set(PEER_SIZES) <= set(LADDER_SIZES)
    # the head-first family is exactly the peers at the counts of PEER_SIZES with "-hf"
    head_first = {f"{name}-hf" for name in PEER_METHODS if _count(name) in PEER_SIZES}
    assert set(FAMILIES["peers-head-first"].methods) == head_first


HEAD_FIRST_PEERS = [f"{peer}-{size}-hf" for peer in ("tinylora-tied", "tinylora", "unilora", "waveft", "fourierft")
                    for size in PEER_SIZES]


@pytest.mark.parametrize("name", [*NEW_PEERS, *[f"fourierft-{size}" for size in LADDER_SIZES], *HEAD_FIRST_PEERS])
def test_peer_has_a_grid_of_at_least_five_rates_around_its_default(name):
    method = METHODS[name]
    assert method.name == name and method.label
    assert len(method.lrs) >= 5 and len(set(method.lrs)) == len(method.lrs)
    assert list(method.lrs) == sorted(method.lrs) and all(lr > 0 for lr in method.lrs)
    # the default (the rate --quick and --no-sweep use) has a rate of the grid on either side
    assert method.lrs[0] < method.default_lr < method.lrs[-1] and method.default_lr in method.lrs


@pytest.mark.parametrize("name", NEW_PEERS)
def test_new_peer_config_builds_fresh_on_query_and_value(name):
    first, second = METHODS[name].config(), METHODS[name].config()
    assert first is not second and first.to_dict() == second.to_dict()
    assert set(first.target_modules) == {"query", "value"}


@pytest.mark.parametrize("name", NEW_PEERS)
def test_new_peer_trains_exactly_the_count_in_its_name_on_minilm(name, encoder):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(encoder), METHODS[name].config())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == _count(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _count(name)


@pytest.mark.parametrize("peer", ["tinylora-tied", "tinylora"])
def test_tinylora_tied_shares_one_vector_and_untied_has_one_per_module(peer, encoder):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(encoder), METHODS[f"{peer}-48"].config())
    vectors = model.base_model.tinylora_v["default"]
    modules = [m for m in model.modules() if isinstance(m, peft.tuners.tinylora.layer.TinyLoraLayer)]
    assert len(modules) == 12
    assert [v.numel() for v in vectors.values()] == ([48] if peer == "tinylora-tied" else [4] * 12)


@pytest.mark.parametrize("name", HEAD_FIRST_PEERS)
def test_head_first_peer_is_its_plain_peer_with_the_head_first(name):
    plain, first = METHODS[name[: -len("-hf")]], METHODS[name]
    assert first.head_first and not plain.head_first
    assert first.config().to_dict() == plain.config().to_dict()
    assert (first.lrs, first.default_lr) == (plain.lrs, plain.default_lr)


SUPERTUNING = [f"supertuning-{size}-hf" for size in (24, 48, 144)]


def test_supertuning_family_is_its_counts_head_first():
    assert FAMILIES["supertuning"].methods == tuple(SUPERTUNING)
    assert all(METHODS[name].head_first and METHODS[name].kind == "peft" for name in SUPERTUNING)


@pytest.mark.parametrize("name", SUPERTUNING)
def test_supertuning_trains_the_largest_entries_of_query_and_value_exactly_the_count_in_its_name(name, encoder):
    import peft

    method = METHODS[name]
    assert len(method.lrs) >= 5 and method.lrs[0] < method.default_lr < method.lrs[-1]
    config = method.config()
    assert set(config.target_modules) == {"query", "value"} and config.select_top and config.r is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(encoder), config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _count(name[: -len("-hf")])
    # the trained entries are the largest-magnitude entries of each weight
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    weight = layer.get_base_layer().weight.detach().abs().flatten()
    per_module = _count(name[: -len("-hf")]) // 12
    chosen = weight[layer.supertuning_indices["default"].to(torch.int64).flatten()]
    assert torch.equal(chosen.sort().values, weight.topk(per_module).values.sort().values)
