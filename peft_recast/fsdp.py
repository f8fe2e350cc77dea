"""Sharding a RECAST model with FSDP: keep every template group inside one FSDP unit.

A RECAST layer builds its update from the pretrained weights of *every* module of its template group
(``delta_W_l = sum_j c_lj W_j``, :mod:`peft_recast.combination`), and the default groups span 2 consecutive layers.
FSDP gathers a unit's parameters only while that unit runs, so a wrapping that puts one layer of a group in one unit and
the next layer in another (the usual one unit per transformer block) hands a layer its siblings' *shards*: FSDP2 fails
with ``aten.mul.Tensor got mixed torch.Tensor and DTensor``, and FSDP1 sees flattened shards. This module gives
wrappings that keep groups whole and a check that refuses the others:

* :func:`fsdp_units` (FSDP2, ``torch.distributed.fsdp.fully_shard``): the transformer blocks grouped so that each
  template group lies in one list, e.g. ``[[layers[0], layers[1]], [layers[2], layers[3]]]`` for the default
  grouping; ``fully_shard(unit)`` shards each list as one unit.
* :func:`fsdp_auto_wrap_policy` (FSDP1 ``FullyShardedDataParallel(auto_wrap_policy=...)`` and accelerate's FSDP1
  plugin): one unit per block when no group crosses blocks, else the smallest module with a ``forward`` that holds
  whole groups (for groups across layers, the decoder or encoder that holds the layer list).
* :func:`check_fsdp_wrapping`: after wrapping, raise ``ValueError`` naming the group and the units it spans.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Callable, Optional

from torch import nn

from .layer import RecastLayer

# prefixes that FSDP1 and activation checkpointing insert into module names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _template_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Every template group of every adapter, by display name: its RECAST layers in model order (the roles of
    fused modules, which share one coefficient tensor, count as one group)."""
    groups: dict[str, dict[int, nn.Module]] = defaultdict(dict)
    adapters = set()
    for module in model.modules():
        if isinstance(module, RecastLayer):
            adapters.update(module.recast_group)
    for module in model.modules():
        if isinstance(module, RecastLayer):
            for adapter, group in module.recast_group.items():
                name = f"'{group.name}'" + (f" of adapter '{adapter}'" if len(adapters) > 1 else "")
                groups[name][id(module)] = module
    return {name: list(members.values()) for name, members in groups.items()}


class _Tree:
    """Parents, RECAST groups and blocks of a (possibly wrapped) model, computed once."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(module): _clean(name) for name, module in model.named_modules()}
        self.parent: dict[int, nn.Module] = {}
        for module in model.modules():
            for child in module.children():
                self.parent.setdefault(id(child), module)
        self.groups = _template_groups(model)
        # members of each group below each module: a module keeps group g whole when it holds 0 or all of them
        self.counts: dict[int, dict[str, int]] = defaultdict(dict)
        for name, members in self.groups.items():
            for member in members:
                for ancestor in self.ancestors(member, include_self=True):
                    counts = self.counts[id(ancestor)]
                    counts[name] = counts.get(name, 0) + 1
        self.blocks = self._outermost_blocks()

    def ancestors(self, module: nn.Module, include_self: bool = False) -> list[nn.Module]:
        chain = [module] if include_self else []
        while id(module) in self.parent:
            module = self.parent[id(module)]
            chain.append(module)
        return chain

    def keeps_groups_whole(self, module: nn.Module) -> bool:
        return all(count == len(self.groups[name]) for name, count in self.counts[id(module)].items())

    def inside_recast_layer(self, module: nn.Module) -> bool:
        return any(isinstance(ancestor, RecastLayer) for ancestor in self.ancestors(module))

    def _outermost_blocks(self) -> list[nn.Module]:
        """The model's transformer blocks (the classes in transformers' ``_no_split_modules``), else the entries of
        its ``nn.ModuleList`` layer stacks; outermost only, in model order."""
        classes = {name for module in self.model.modules() for name in getattr(module, "_no_split_modules", None) or []}
        if classes:
            found = [module for module in self.model.modules() if type(module).__name__ in classes]
        else:
            found = [child for module in self.model.modules() if isinstance(module, nn.ModuleList) for child in module]
        ids = {id(module) for module in found}
        return [module for module in found if not any(id(a) in ids for a in self.ancestors(module))]

    def block_of(self, module: nn.Module) -> Optional[nn.Module]:
        ids = {id(block) for block in self.blocks}
        return next((a for a in self.ancestors(module, include_self=True) if id(a) in ids), None)


def _has_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs code of its own (an ``nn.ModuleList`` or ``nn.ModuleDict`` is never called, so
    FSDP could not gather its parameters)."""
    return type(module).forward is not nn.Module.forward


def fsdp_units(model: nn.Module) -> list[list[nn.Module]]:
    """The transformer blocks of ``model`` in FSDP2 units that keep every RECAST template group whole.

    Blocks are the modules whose class transformers lists in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), or, for
    a model without them, the entries of its ``nn.ModuleList`` layer stacks. Blocks that share a template group go
    into one unit (with the default ``layers_per_group=2``: blocks ``[0, 1]``, ``[2, 3]``, ...); a block no group
    crosses is a unit of its own. A group with a module outside every block (e.g. an adapted ``lm_head``) keeps the
    blocks of its other modules out of every unit, so that they stay in the root unit with it.

    Args:
        model (`torch.nn.Module`): The RECAST model (a ``PeftModel``, or its base model), before sharding.

    Returns:
        `list[list[torch.nn.Module]]`: Units in model order; shard each with ``fully_shard(unit)``, then the root.

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM

        >>> config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = get_peft_model(LlamaForCausalLM(config), peft_recast.RecastConfig())  # groups of 2 layers
        >>> [len(unit) for unit in peft_recast.fsdp.fsdp_units(model)]  # layers 0-1 and 2-3
        [2, 2]
        >>> # then, in each process: for unit in fsdp_units(model): fully_shard(unit, mesh=mesh)
        >>> #                        fully_shard(model, mesh=mesh)

        ```
    """
    tree = _Tree(model)
    index = {id(block): i for i, block in enumerate(tree.blocks)}
    root = list(range(len(tree.blocks)))  # union-find over blocks

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    excluded = set()
    for members in tree.groups.values():
        blocks = [tree.block_of(member) for member in members]
        spanned = sorted({index[id(block)] for block in blocks if block is not None})
        if any(block is None for block in blocks):
            excluded.update(spanned)
        for i in spanned[1:]:
            root[find(i)] = find(spanned[0])
    units: dict[int, list[nn.Module]] = {}
    for i, block in enumerate(tree.blocks):
        units.setdefault(find(i), []).append(block)
    excluded = {find(i) for i in excluded}
    return [unit for key, unit in units.items() if key not in excluded]


def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An FSDP1 auto-wrap policy for a RECAST model that never splits a template group across FSDP units.

    Plays the part of ``peft.utils.other.fsdp_auto_wrap_policy`` (LoRA's, which wraps every transformer block and so
    splits RECAST's default groups of 2 layers). A module gets a unit of its own when it holds every module or none of
    each template group, is not part of a RECAST layer, and is

    * a transformer block (as in :func:`fsdp_units`), or
    * for a group that no such block holds, the group's smallest common ancestor that has a ``forward`` (the layer list
      itself is never called, so its parent: the decoder or encoder), going up until it holds whole groups.

    With the default grouping a Llama's units are the root and ``model.model`` (embeddings, layers and norm): correct
    but coarse. For one unit per group of blocks use FSDP2 with :func:`fsdp_units`; with ``layers_per_group=1`` the
    policy wraps every block.

    FSDP1 needs ``use_orig_params=True``: the coefficients train beside frozen base weights in one module.

    Args:
        model (`torch.nn.Module`): The RECAST model to wrap (a ``PeftModel``, or its base model).

    Returns:
        `Callable`: A policy for ``FullyShardedDataParallel(auto_wrap_policy=...)`` or
        ``accelerator.state.fsdp_plugin.auto_wrap_policy``.

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM

        >>> config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = get_peft_model(LlamaForCausalLM(config), peft_recast.RecastConfig())
        >>> policy = peft_recast.fsdp_auto_wrap_policy(model)
        >>> policy(model.base_model.model.model.layers[0], recurse=False, nonwrapped_numel=0)  # splits a group
        False
        >>> policy(model.base_model.model.model, recurse=False, nonwrapped_numel=0)
        True
        >>> # FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, ...)

        ```
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    tree = _Tree(model)
    chosen = {
        id(block) for block in tree.blocks if tree.keeps_groups_whole(block) and not tree.inside_recast_layer(block)
    }
    for name, members in tree.groups.items():
        blocks = [tree.block_of(member) for member in members]
        if all(block is not None and id(block) in chosen for block in blocks):
            continue  # inside wrapped blocks
        home = next((
            ancestor for ancestor in tree.ancestors(members[0], include_self=True)
            if tree.counts[id(ancestor)].get(name, 0) == len(members) and _has_forward(ancestor)
            and tree.keeps_groups_whole(ancestor) and not tree.inside_recast_layer(ancestor)
        ), None)  # fmt: skip
        if home is not None and home is not model:
            chosen.add(id(home))

    def wrap(module: nn.Module) -> bool:
        return id(module) in chosen

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=wrap)


def _unit_key(module: nn.Module) -> Optional[Any]:
    """The FSDP unit that ``module`` starts (FSDP1 wrapper or FSDP2 state), else ``None``."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

    if isinstance(module, FullyShardedDataParallel):
        return module
    if isinstance(module, FSDPModule):
        return fully_shard.state(module)  # one state for the modules of a `fully_shard([...])` list
    return None


def check_fsdp_wrapping(model: nn.Module) -> dict[str, str]:
    """Check that FSDP (``fully_shard`` or ``FullyShardedDataParallel``) put every RECAST template group in one unit.

    A group split across units would build its layers' updates from other units' parameter shards (FSDP2 raises
    ``mixed torch.Tensor and DTensor`` at the first forward; FSDP1 would read flattened shards), and a unit inside a
    RECAST layer would never be gathered (the layer reads its base weight without calling the base layer).

    Args:
        model (`torch.nn.Module`): The model after sharding (call on every process, or on one: all agree).

    Returns:
        `dict[str, str]`: Each group's FSDP unit (names of the modules that start it; ``""`` is the root module).

    Raises:
        ValueError: naming the split group, the units of its modules and how to wrap instead.

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM

        >>> config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = get_peft_model(LlamaForCausalLM(config), peft_recast.RecastConfig())
        >>> placement = peft_recast.check_fsdp_wrapping(model)  # not sharded yet: one (root) unit, named ""
        >>> placement["'model.layers.0-1.self_attn.q_proj'"]
        ''
        >>> # after `fully_shard(layer)` for every decoder layer it raises ValueError: "... splits the RECAST template
        >>> # group 'model.layers.0-1.self_attn.q_proj' ..."

        ```
    """
    tree = _Tree(model)
    unit_of: dict[int, Any] = {}
    starts: dict[int, list[str]] = defaultdict(list)  # unit -> names of the modules that start it
    for name, module in model.named_modules():
        key = _unit_key(module)
        if key is None:
            parent = tree.parent.get(id(module))
            key = unit_of.get(id(parent)) if parent is not None else None
        else:
            starts[id(key)].append(_clean(name))
            recast = next((a for a in tree.ancestors(module) if isinstance(a, RecastLayer)), None)
            if recast is not None:
                raise ValueError(
                    f"FSDP wrapped '{_clean(name)}' as a unit of its own inside the RECAST layer "
                    f"'{tree.names[id(recast)]}': the layer reads its base weight directly, so FSDP would never gather "
                    "it. Wrap whole RECAST layers (or the blocks that hold them): use "
                    "`peft_recast.fsdp_auto_wrap_policy(model)` or `peft_recast.fsdp.fsdp_units(model)`."
                )
        unit_of[id(module)] = key

    def unit_name(key: Any) -> str:
        return "" if key is None else " + ".join(starts[id(key)])

    placement = {}
    for group, members in tree.groups.items():
        by_unit: dict[str, list[str]] = defaultdict(list)
        for member in members:
            by_unit[unit_name(unit_of[id(member)])].append(tree.names[id(member)])
        if len(by_unit) > 1:
            spread = "; ".join(
                f"{', '.join(repr(m) for m in modules)} in unit {repr(unit) if unit else '<root>'}"
                for unit, modules in by_unit.items()
            )
            raise ValueError(
                f"The FSDP wrapping splits the RECAST template group {group} across {len(by_unit)} units: {spread}. "
                "Each RECAST layer builds its update from the pretrained weights of every module of its group, so "
                "the group must lie in one FSDP unit. Shard the units of `peft_recast.fsdp.fsdp_units(model)` with "
                "`fully_shard(unit)` (FSDP2), or wrap with `auto_wrap_policy=peft_recast.fsdp_auto_wrap_policy(model)` "
                "(FSDP1), instead of one unit per transformer block."
            )
        placement[group] = next(iter(by_unit))
    return placement
