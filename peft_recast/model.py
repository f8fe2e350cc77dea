"""The RECAST tuner, PEFT's hooks only: injection and its Neural Mimicry, load checks, merging, ``adapter_names``."""

from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from peft.utils.other import ModulesToSaveWrapper, _get_submodules
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checkpoint import coefficient_problem, fill_shared_coefficients, shared_coefficient_keys, with_block_axis
from .config import GROUPING_FIELDS, RecastConfig, differing_field
from .gates import finish_gates
from .layer import Conv2d, Linear, RecastLayer
from .mimicry import fingerprint_mismatch, wrapper_prefix
from .planning import (
    TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING,
    GroupFits,
    adapter_layers,
    attach_channels,
    build_groups,
    is_target,
    resolve_targets,
)
from .quantized import QuantizedBase, QuantizedLinear, is_bnb_linear


@dataclass(frozen=True)
class _BatchAdapters:
    """The ``adapter_names`` of the forward or ``generate`` call running in this thread: one per row, and one per
    input of an encoder-decoder's encoder (which beam search does not repeat)."""

    rows: list[str]
    encoder_rows: list[str]


# Per thread (and asyncio task): concurrent calls on one model each see their own adapter names, whichever call's
# hooks run.
_BATCH_ADAPTERS: ContextVar[Optional[_BatchAdapters]] = ContextVar("recast_batch_adapters", default=None)


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: Optional[dict] = None, *,
                                    in_encoder: bool) -> Optional[tuple[tuple, dict]]:
    """Give ``module`` this thread's ``adapter_names``. PyTorch stores a hook a moment before marking it as taking
    ``kwargs``; a forward in another thread in that moment calls it without them, and it then does nothing (that
    thread's own hooks are complete)."""
    batch = _BATCH_ADAPTERS.get()
    if kwargs is None or batch is None:
        return None
    kwargs["adapter_names"] = batch.encoder_rows if in_encoder else batch.rows
    return args, kwargs


class RecastModel(QuantizedBase, BaseTuner):
    """Creates a RECAST model from a pretrained transformers model (use ``peft.get_peft_model``).

    Every adapter (task) gets ``K x n x B`` coefficients per target module; templates are rebuilt from the base
    weights by closed-form Neural Mimicry whenever an adapter is injected (see :mod:`peft_recast.mimicry`), so adapter
    files hold coefficients only. The hooks below are PEFT's; planning and fitting the groups live in
    :mod:`peft_recast.planning`.

    Args:
        model (`torch.nn.Module`): The model to adapt.
        config (`RecastConfig`): The adapter's configuration.
        adapter_name (`str`): The adapter's name (PEFT's default is ``"default"``).
        low_cpu_mem_usage (`bool`, defaults to `False`): Create the coefficients on the meta device (loading).

    Example:

        ```py
        >>> import torch, peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig(layers_per_group=4, coefficient_blocks=1))
        >>> model.add_adapter("task_b", peft_recast.RecastConfig(layers_per_group=4, coefficient_blocks=1))
        >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> _ = model.eval()
        >>> mixed = model(input_ids=ids, adapter_names=["default", "task_b"]).last_hidden_state  # a task per row
        >>> with model.disable_adapter():
        ...     bare = model(input_ids=ids).last_hidden_state
        >>> torch.allclose(mixed, bare)  # adapters start as the identity
        True

        ```

    **Attributes**:
        - **model** (`torch.nn.Module`) -- The adapted model.
        - **peft_config** (`dict[str, RecastConfig]`) -- The adapters' configurations, by name.
        - **group_fits** (`GroupFits`) -- The closed-form fits of the groups, shared by adapters of one grouping.
    """

    prefix: str = "recast_"
    tuner_layer_cls = RecastLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.group_fits = GroupFits()  # before PEFT's __init__, which injects the first adapter
        super().__init__(*args, **kwargs)

    def _create_and_replace(
        self,
        recast_config: RecastConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, RecastLayer):
            target.update_layer(adapter_name, recast_config)
            return
        new_module = self._create_new_module(recast_config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            # adding an additional adapter: it is not automatically trainable
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(recast_config: RecastConfig, adapter_name: str, target: nn.Module) -> RecastLayer:
        """The RECAST layer for ``target``, chosen by the type of its base layer (the one dispatch of layer types)."""
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if is_bnb_linear(base_layer):  # bitsandbytes 4-bit and 8-bit layers subclass nn.Linear: before it
            return QuantizedLinear(target, adapter_name, recast_config)
        if isinstance(base_layer, Conv1D):
            if not recast_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Using True for it.")
            return Linear(target, adapter_name, recast_config, fan_in_fan_out=True)
        if isinstance(base_layer, nn.Conv2d):
            return Conv2d(target, adapter_name, recast_config)
        if isinstance(base_layer, nn.Linear):
            if recast_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Using False for it."
                )
            return Linear(target, adapter_name, recast_config, fan_in_fan_out=False)
        raise TypeError(
            f"Target module {target} is not supported. RECAST supports `torch.nn.Linear`, `torch.nn.Conv2d` and "
            "`transformers.pytorch_utils.Conv1D`; remove this module from `target_modules`."
        )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, then Neural Mimicry over the groups of the new adapter's modules.

        Fails clean: whatever raises (a bad config, meta-device weights, an all-zero group, a foreign adapter, an
        interrupt), every module wrapped for ``adapter_name`` is unwrapped again and every parameter gets back its
        ``requires_grad``, so the model is exactly as it was before the call.
        """
        requires_grad = []  # the fast path adds parameters and changes no other's flag: only PEFT's pass needs these
        try:
            if low_cpu_mem_usage or not self.inject_like_existing(model, adapter_name):
                requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
                super().inject_adapter(
                    model,
                    adapter_name,
                    autocast_adapter_dtype=autocast_adapter_dtype,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    state_dict=state_dict,
                )
                self._fit_templates(model, adapter_name)
            config, layers = self.peft_config[adapter_name], adapter_layers(model, adapter_name)
            attach_channels(layers, adapter_name, config.channels or {})
            finish_gates(layers, adapter_name, config)
        except BaseException:
            self._remove_adapter_layers(model, adapter_name, adapter_layers(model, adapter_name, members=True))
            for parameter, flag in requires_grad:
                parameter.requires_grad = flag
            raise

    def inject_like_existing(self, model: nn.Module, adapter_name: str) -> bool:
        """The fast path of a new adapter whose grouping an adapter on the model has already (the usual case when one
        model serves many tasks): every layer of that adapter gets new coefficients sharing its group and mixing, in
        a few operations per layer, without PEFT's pass over the model or mimicry. Returns ``False`` (nothing done)
        when no such adapter exists or the config needs the general path (``modules_to_save``, trained biases,
        trainable tokens, the replacement form)."""
        config = self.peft_config[adapter_name]
        if config.modules_to_save or config.bias != "none" or config.weight_form != "residual" or getattr(
            config, "trainable_token_indices", None
        ):
            return False
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        template = next((
            name for name, other in self.peft_config.items()
            if name != adapter_name and isinstance(other, RecastConfig) and other.base_fingerprint is not None
            and not other.modules_to_save and other.bias == "none"
            and differing_field(other, config) is None
        ), None)
        layers = adapter_layers(model, template, members=True) if template is not None else {}
        if not layers or any(l.recast_group[template].fitted != l.recast_group[template].weights_state()
                             for l in layers.values()):
            return False  # no such adapter, or a base weight changed since its templates were fitted: fit anew
        fingerprint = self.peft_config[template].base_fingerprint
        if config.base_fingerprint is not None:
            self._check_fingerprint(adapter_name, config, fingerprint)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        for layer in sorted(layers.values(), key=lambda layer: template in layer.recast_tie):  # owners first
            layer.add_adapter_like(adapter_name, template, config, trainable)
        config.base_fingerprint = fingerprint
        return True

    def _check_fingerprint(self, adapter_name: str, config: RecastConfig, fingerprint: dict[str, list[float]]) -> None:
        """Refuse an adapter whose saved ``base_fingerprint`` does not match this model's weights (or names the same
        groups under a wrapper's prefix: then the message says so)."""
        wrapped = wrapper_prefix(config.base_fingerprint, fingerprint)
        if wrapped is not None:
            source, longer, shorter = (("a model that holds this one", "the adapter's", "this model's")
                                       if wrapped.on_adapter else ("the model this one wraps", "this model's",
                                                                   "the adapter's"))
            raise ValueError(
                f"The RECAST adapter '{adapter_name}' was saved from {source} under '{wrapped.prefix[:-1]}': {longer} "
                f"module keys are {shorter} with '{wrapped.prefix}' in front. The weights may be the same, but the "
                "keys differ: load the adapter onto a model with the module keys it was saved with, or save it from "
                "the model you load it onto."
            )
        problem = fingerprint_mismatch(config.base_fingerprint, fingerprint)
        if problem is not None:
            raise ValueError(
                f"The RECAST adapter '{adapter_name}' does not belong to this base model: {problem}. Its "
                "coefficients only have a meaning with the templates of the model it was trained on (or a "
                "model that was merged or modified since). Load it onto that base model "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}); to start a new adapter on "
                "this model, use a RecastConfig whose base_fingerprint is None."
            )

    def _fit_templates(self, model: nn.Module, adapter_name: str) -> None:
        """Fit and attach the template groups of ``adapter_name`` (:func:`~peft_recast.planning.build_groups`); sets
        the config's ``base_fingerprint``, or checks it against this model's weights when the adapter is loaded."""
        config = self.peft_config[adapter_name]
        layers = adapter_layers(model, adapter_name)
        fingerprint = build_groups(model, adapter_name, config, layers, self.group_fits)
        if config.base_fingerprint is not None:
            self._check_fingerprint(adapter_name, config, fingerprint)
        config.base_fingerprint = fingerprint

    @staticmethod
    def _check_target_module_exists(peft_config: RecastConfig, key: str) -> Union[bool, re.Match, None]:
        return is_target(peft_config, key)

    def _prepare_adapter_config(self, peft_config: RecastConfig, model_config: dict) -> RecastConfig:
        """Resolve a preset's target (and fused) modules for this model type, then the default target modules."""
        return resolve_targets(peft_config, model_config)

    @staticmethod
    def _remove_adapter_layers(model: nn.Module, adapter_name: str, layers: dict[str, RecastLayer]) -> None:
        """Undo an injection: drop the adapter, unwrap layers left without any adapter, and unwrap the
        ``modules_to_save`` copies that only this adapter had."""
        for key, layer in layers.items():
            layer.delete_adapter(adapter_name)
            if not layer.recast_coefficients:
                parent, _, target_name = _get_submodules(model, key)
                setattr(parent, target_name, layer.get_base_layer())
        for key, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and set(module.modules_to_save) == {adapter_name}:
                parent, _, target_name = _get_submodules(model, key)
                setattr(parent, target_name, module.original_module)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add ``adapter_name`` whose coefficients are ``sum_i weights[i] * mean_K(theta_i)`` of ``adapters`` (every
        set of the new adapter holds that sum). Adapters of one grouping on one base model share every layer's basis
        and mixing, and a residual adapter's update is linear in its coefficients, so

            delta_W(sum_i w_i mean_K(theta_i)) = sum_i w_i delta_W(theta_i)        exactly (task arithmetic).

        ``combination_type`` is PEFT's argument; RECAST's combination is exact, so ``"linear"`` is the only one.

        The new adapter is not made active. Raises ``ValueError`` (and adds nothing) when an adapter is unknown, the
        name is taken, the adapters differ in grouping (:data:`~peft_recast.config.GROUPING_FIELDS`) or base model,
        use the replacement form (affine, not linear, in ``theta``), a ``coefficient_bound`` or gates, or when two
        of them train a copy of the same module (``modules_to_save``, which cannot be summed). As in PEFT, the new
        adapter gets fresh copies of the first adapter's ``modules_to_save``.
        """
        if combination_type != "linear":
            raise ValueError(
                f"RECAST combines adapters exactly by adding their coefficients, combination_type='linear'; got "
                f"{combination_type!r} (LoRA's 'svd', 'cat', 'ties', ... approximate products of low-rank factors, "
                "which RECAST does not have)."
            )
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(
                f"Pass one weight per adapter: got {len(adapters)} adapter(s) and {len(weights)} weight(s)."
            )
        unknown = [name for name in adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; this model has {sorted(self.peft_config)}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named '{adapter_name}' exists already; choose another `adapter_name`.")
        configs = [self.peft_config[name] for name in adapters]
        for name, config in zip(adapters[1:], configs[1:]):
            field = differing_field(configs[0], config, GROUPING_FIELDS + ("base_fingerprint",))
            if field is not None:
                raise ValueError(
                    f"Cannot combine RECAST adapters '{adapters[0]}' and '{name}': `{field}` is "
                    f"{getattr(configs[0], field)!r} for one and {getattr(config, field)!r} for the other. Only "
                    "adapters made with the same grouping on the same base model share their templates, so only they "
                    "add up exactly."
                )
        if configs[0].weight_form != "residual":
            raise ValueError(
                "Cannot combine RECAST adapters in the replacement form (`weight_form='replace'`): their weight is "
                "affine, not linear, in the coefficients. Combine residual adapters."
            )
        if configs[0].coefficient_bound is not None:
            raise ValueError(
                f"Cannot combine RECAST adapters with a `coefficient_bound` ({configs[0].coefficient_bound:g}): the "
                "bound makes the update a nonlinear function (b tanh(theta / b)) of the coefficients, so sums of "
                "coefficients are not sums of updates. Combine adapters made with coefficient_bound=None."
            )
        if configs[0].module_gates:
            raise ValueError(
                "Cannot combine RECAST adapters with `module_gates`: a gate multiplies its module's update by 0 or 1, "
                "which sums of coefficients do not carry. Call peft_recast.prune_gates on each adapter first."
            )
        shared_copies = [
            module for module in self.model.modules() if isinstance(module, ModulesToSaveWrapper)
            and sum(name in module.modules_to_save for name in adapters) > 1
        ]
        if shared_copies:
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                f"{len(shared_copies)} such instance(s)."
            )
        self.peft_config[adapter_name] = copy.deepcopy(configs[0])
        try:
            self.inject_adapter(self.model, adapter_name)
        except BaseException:
            del self.peft_config[adapter_name]
            raise
        with torch.no_grad():
            for layer in adapter_layers(self.model, adapter_name).values():
                if adapter_name in layer.recast_tie:
                    continue  # a fused member: it shares its owner's coefficient tensor
                target = layer.recast_coefficients[adapter_name]
                total = sum(w * layer.recast_coefficients[name].float().mean(0) for name, w in zip(adapters, weights))
                target.copy_(total.to(target.dtype).expand_as(target))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``; with ``safe_merge`` every layer's coefficients are checked before any is
        merged, so a broken adapter raises without leaving some layers merged."""
        if safe_merge:
            self._check_finite_coefficients(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge and safe_merge:  # before PEFT starts merging *and unwrapping* layers one by one
            self._check_finite_coefficients(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _check_finite_coefficients(self, adapter_names: Optional[list[str]]) -> None:
        """Raise PEFT's ``safe_merge`` error if any coefficient of the adapters to merge is NaN or infinite."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for key, module in self.model.named_modules():
            if not isinstance(module, RecastLayer):
                continue
            for name in names:
                if name in module.recast_coefficients and not torch.isfinite(module.recast_coefficients[name]).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {name} seems to be broken: its "
                        f"coefficients in '{key}' are NaN or infinite. Nothing was merged."
                    )

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: RecastConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection of the adapter's entries, each shared coefficient tensor once (under its owner's key;
        :func:`~peft_recast.checkpoint.shared_coefficient_keys`): PEFT's key format, fewer header entries."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layers = adapter_layers(model, adapter_name)
        layers = {key.replace("_fsdp_wrapped_module.", ""): layer for key, layer in layers.items()}
        for key, owner_key in shared_coefficient_keys(layers, adapter_name).items():
            if owner_key in selected:
                selected.pop(key, None)
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: RecastConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key remapping (a ``(K, n)`` tensor of an older file gets its block axis; a shared coefficient tensor
        saved once fills every module that shares it), then a
        check of the coefficients before they are loaded: a missing, unexpected, misshapen, non-float or non-finite
        coefficient tensor raises ``ValueError`` and removes the adapter again."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = adapter_layers(model, adapter_name)
        state_dict = with_block_axis(layers, adapter_name, fill_shared_coefficients(layers, adapter_name, state_dict))
        problem = coefficient_problem(layers, adapter_name, state_dict)
        if problem is not None:
            cls._remove_adapter_layers(model, adapter_name, adapter_layers(model, adapter_name, members=True))
            peft_config = getattr(model, "peft_config", None)
            if isinstance(peft_config, dict):
                peft_config.pop(adapter_name, None)
            raise ValueError(
                f"Cannot load the RECAST adapter '{adapter_name}': {problem} The adapter was removed again."
            )
        return state_dict

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route ``adapter_names`` (one per sample, ``"__base__"`` for none) to every RECAST layer and to the
        ``modules_to_save`` / trainable-token wrappers; repeat them per beam for beam search (encoder excepted)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        layers = [module for module in self.modules() if isinstance(module, RecastLayer)]
        known = set().union(*(layer.recast_coefficients.keys() for layer in layers))
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        rows = list(adapter_names)
        num_beams = kwargs.get("num_beams", None)
        if isinstance(num_beams, int) and num_beams > 1:
            # generate() repeats every input num_beams times (the encoder of an encoder-decoder model excepted)
            rows = [name for name in adapter_names for _ in range(num_beams)]
        wrapped = (RecastLayer, AuxiliaryTrainingWrapper)  # + modules_to_save / trainable tokens
        encoder = _get_encoder(self.model)
        in_encoder = {id(module) for module in encoder.modules()} if encoder is not None else set()
        handles = [
            module.register_forward_pre_hook(
                partial(_adapter_names_pre_forward_hook, in_encoder=id(module) in in_encoder), with_kwargs=True
            )
            for module in self.modules() if isinstance(module, wrapped)
        ]
        token = _BATCH_ADAPTERS.set(_BatchAdapters(rows=rows, encoder_rows=list(adapter_names)))
        try:
            yield
        finally:
            _BATCH_ADAPTERS.reset(token)
            for handle in handles:
                handle.remove()


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model, else ``None`` (transformers 5 returns the model itself)."""
    if not hasattr(model, "get_encoder"):
        return None
    encoder = model.get_encoder()
    return None if encoder is model else encoder
