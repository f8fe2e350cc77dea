"""FSDP: wrappings that keep every RECAST template group in one unit (``peft_recast.fsdp``), and 2 CPU processes (gloo)
that train the coefficients of 1 process.

Run as a script, this file is the distributed worker::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/library/test_fsdp.py OUT_DIR

Each process takes half of every batch; it (1) shards one unit per decoder layer, which splits the default groups of 2
layers, and records what :func:`check_fsdp_wrapping` and a forward pass say; (2) trains with FSDP2 (``fully_shard`` on
:func:`fsdp_units`) and (3) with FSDP1 (``FullyShardedDataParallel`` with :func:`fsdp_auto_wrap_policy`), saving each
adapter from a full state dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_recast
from peft_recast import RecastConfig, check_fsdp_wrapping, fsdp_auto_wrap_policy
from peft_recast.fsdp import fsdp_units
from tests.models import RecastDeepMLP, tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8
STEPS = 5


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _wrapped(model: torch.nn.Module) -> list[str]:
    """The modules the policy gives a unit of their own."""
    policy = fsdp_auto_wrap_policy(model)
    return [name for name, module in model.named_modules() if policy(module, recurse=False, nonwrapped_numel=0)]


LAYERS = "base_model.model.model.layers"


@pytest.mark.parametrize(
    ("fields", "units", "wrapped"),
    [
        ({}, [[0, 1], [2, 3]], ["base_model.model.model"]),  # default: groups of 2 layers cross the blocks
        ({"num_groups": 1}, [[0, 1, 2, 3]], ["base_model.model.model"]),
        ({"layers_per_group": 1, "num_templates": 1}, [[0], [1], [2], [3]], [f"{LAYERS}.{i}" for i in range(4)]),
        ({"layers_per_group": 3}, [[0, 1, 2], [3]], ["base_model.model.model", f"{LAYERS}.3"]),
    ],
)
def test_units_and_policy_keep_each_group_in_one_unit(fields, units, wrapped):
    model = get_peft_model(tiny_llama(), RecastConfig(**fields))
    names = _names(model)
    assert [[names[id(block)] for block in unit] for unit in fsdp_units(model)] == [
        [f"{LAYERS}.{i}" for i in unit] for unit in units
    ]
    assert _wrapped(model) == wrapped


def test_policy_wraps_a_group_outside_the_blocks_whole_and_never_inside_a_recast_layer():
    """``lm_head`` is a group of its own outside every block: the policy wraps the RECAST layer (never its
    ``base_layer``, which the layer reads without calling), and ``fsdp_units`` leaves the blocks as they were."""
    model = get_peft_model(tiny_llama(), RecastConfig(target_modules=["q_proj", "lm_head"], num_templates=1))
    assert _wrapped(model) == ["base_model.model.model", "base_model.model.lm_head"]
    assert [len(unit) for unit in fsdp_units(model)] == [2, 2]


def test_plain_torch_model_uses_its_layer_list_and_fused_roles_are_one_group():
    model = get_peft_model(RecastDeepMLP(), RecastConfig(target_modules=["lin0", "lin1"]))
    names = _names(model)
    assert [[names[id(b)] for b in unit] for unit in fsdp_units(model)] == [
        ["base_model.model.layers.0", "base_model.model.layers.1"],
        ["base_model.model.layers.2", "base_model.model.layers.3"],
    ]
    assert _wrapped(model) == ["base_model.model"]  # the layer list has no forward: its parent, here the whole MLP
    fused = get_peft_model(
        tiny_bert(), RecastConfig(target_modules=["query", "key", "value"], fused_modules=["query", "key", "value"])
    )
    assert check_fsdp_wrapping(fused) == {  # not sharded: one root unit; q/k/v roles share one coefficient tensor
        "'encoder.layer.0-1.attention.self.query+key+value'": "",
        "'encoder.layer.2-3.attention.self.query+key+value'": "",
    }
    names = _names(fused)
    assert [[names[id(b)] for b in unit] for unit in fsdp_units(fused)] == [
        ["base_model.model.embeddings"],  # a block without RECAST layers is a unit of its own
        ["base_model.model.encoder.layer.0", "base_model.model.encoder.layer.1"],
        ["base_model.model.encoder.layer.2", "base_model.model.encoder.layer.3"],
    ]


def test_groups_of_several_adapters_are_named_with_their_adapter():
    model = get_peft_model(tiny_llama(), RecastConfig())
    model.add_adapter("other", RecastConfig(num_groups=1))
    placement = check_fsdp_wrapping(model)
    assert "'model.layers.0-3.self_attn.q_proj' of adapter 'other'" in placement
    assert [len(unit) for unit in fsdp_units(model)] == [4]  # adapter 'other' groups all 4 layers


# ------------------------------------------------------------------------------------------ the distributed worker


def _batches() -> torch.Tensor:
    return torch.randint(1, 100, (STEPS, GLOBAL_BATCH, 9), generator=torch.Generator().manual_seed(0))


def _train(model: torch.nn.Module, rank: int, world: int) -> list[float]:
    """AdamW at RECOMMENDED_LR on this process's share of every batch (all tokens labelled, equal lengths: the mean of
    the processes' mean losses is the mean loss of the whole batch)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=peft_recast.RECOMMENDED_LR)
    model.train()
    losses = []
    for batch in _batches():
        ids = batch.chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _worker(output_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard


    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    report: dict = {"world": world}

    # (1) one unit per decoder layer splits the groups of 2 layers
    model = get_peft_model(tiny_llama(), RecastConfig(task_type="CAUSAL_LM"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        check_fsdp_wrapping(model)
    except ValueError as error:
        report["check_error"] = str(error)
    try:
        model(input_ids=_batches()[0].chunk(world)[rank])
    except RuntimeError as error:
        report["forward_error"] = str(error).splitlines()[0]

    # (2) FSDP2 on the units of `fsdp_units`
    model = get_peft_model(tiny_llama(), RecastConfig(task_type="CAUSAL_LM"))
    units = fsdp_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report["fsdp2_placement"] = check_fsdp_wrapping(model)
    report["fsdp2_losses"] = _train(model, rank, world)
    report["fsdp2_coefficients_sharded"] = all(
        type(p).__name__ == "DTensor" for n, p in model.named_parameters() if p.requires_grad
    )
    # full (unsharded) tensors on every process; on a CPU-only machine FSDP1's `cpu_offload=True` crashes torch 2.13
    # (SIGSEGV cloning the state dict, a plain Llama without PEFT too), so neither kind asks for it
    full = StateDictOptions(full_state_dict=True)
    state_dict = get_model_state_dict(model, options=full)
    model.save_pretrained(os.path.join(output_dir, "fsdp2"), state_dict=state_dict, is_main_process=rank == 0)

    # (3) FSDP1 with the auto-wrap policy
    model = get_peft_model(tiny_llama(), RecastConfig(task_type="CAUSAL_LM"))
    policy = fsdp_auto_wrap_policy(model)
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    report["fsdp1_placement"] = check_fsdp_wrapping(wrapped)
    report["fsdp1_losses"] = _train(wrapped, rank, world)
    state_dict = get_model_state_dict(wrapped, options=full)
    # FSDP1 renames the modules it wraps (`..._fsdp_wrapped_module.layers...`) and PEFT 0.21 strips that only from the
    # front of a name, so `save_pretrained` on the wrapped model finds no adapter entries: load the full state dict
    # into an unsharded model and save that
    if rank == 0:
        plain = get_peft_model(tiny_llama(), RecastConfig(task_type="CAUSAL_LM"))
        plain.load_state_dict(state_dict)
        plain.save_pretrained(os.path.join(output_dir, "fsdp1"))

    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(report, file)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_with_fsdp_train_the_coefficients_of_one(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "/tmp")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert reports[0]["world"] == 2

    # (1) the split wrapping: refused by the check, and FSDP2 itself fails at the first forward
    message = reports[0]["check_error"]
    assert "splits the RECAST template group 'model.layers.0-1.self_attn.q_proj' across 2 units" in message
    assert f"in unit '{LAYERS}.0'" in message and f"in unit '{LAYERS}.1'" in message
    assert "mixed torch.Tensor and DTensor" in reports[0]["forward_error"]

    # (2), (3) the wrappings of peft_recast.fsdp: each group in one unit, coefficients sharded (FSDP2)
    assert set(reports[0]["fsdp2_placement"].values()) == {
        f"{LAYERS}.0 + {LAYERS}.1", f"{LAYERS}.2 + {LAYERS}.3"
    }
    assert set(reports[0]["fsdp1_placement"].values()) == {"base_model.model.model"}
    assert reports[0]["fsdp2_coefficients_sharded"]

    # one process, the whole batch
    model = get_peft_model(tiny_llama(), RecastConfig(task_type="CAUSAL_LM"))
    losses = _train(model, 0, 1)
    for kind in ("fsdp2", "fsdp1"):
        mean_losses = [(a + b) / 2 for a, b in zip(reports[0][f"{kind}_losses"], reports[1][f"{kind}_losses"])]
        torch.testing.assert_close(mean_losses, losses, rtol=0, atol=1e-5)
        # the adapter saved from the sharded model loads into a plain (unsharded) model
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / kind))
        trained = {n: p for n, p in model.named_parameters() if "recast_coefficients" in n}
        assert trained and all(p.abs().sum() > 0 for p in trained.values())
        for name, parameter in loaded.named_parameters():
            if "recast_coefficients" in name:
                torch.testing.assert_close(parameter, trained[name], rtol=1e-4, atol=1e-6)
        ids = _batches()[0]
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-5)
        model.train()


if __name__ == "__main__":
    _worker(sys.argv[1])
