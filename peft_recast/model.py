"""The RECAST tuner, PEFT's hooks only: injection and its Neural Mimicry, load checks, merging, ``adapter_names``."""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper
from peft.utils.other import ModulesToSaveWrapper, _get_submodules
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .adapters import coefficient_problem, fill_shared_coefficients, shared_coefficient_keys
from .bank import BankGroup, TemplateBank, load_template_bank
from .channels import attach_channels
from .config import GROUPING_FIELDS, RecastConfig, config_list, differing_field, preset_fields
from .gates import finish_gates
from .grouping import (
    RecastGroup,
    adapter_layers,
    flat_cat,
    fuse_groups,
    layer_index,
    layers_to_transform_problem,
    plan_groups,
    role_and_index,
    warn_if_templates_exceed_groups,
)
from .layer import Conv2d, Linear, RecastLayer
from .mimicry import GroupFit, fingerprint_mismatch, fit_group
from .quantized import QuantizedBase, QuantizedLinear, is_bnb_linear

# Show a progress bar for mimicry once the targeted weights exceed this many elements (~a 100M-parameter model).
PROGRESS_MIN_NUMEL = 100_000_000
# Default target modules per transformers model type: LoRA's attention query/value choice, plus ViT (module names
# of transformers 5).
TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "vit": ["q_proj", "v_proj"],
}


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _coefficient_unit(norm: float, config: RecastConfig, num_templates: int) -> float:
    """What a unit coefficient moves a layer by along one unit template: ``s ||W||_F / sqrt(n)``, so that moving all
    ``n`` coefficients by ``c`` moves the weight by ``c s ||W||_F`` whatever ``n`` is (AdamW moves every coefficient by
    about the learning rate per step, so the best learning rate does not depend on the number of templates)."""
    return norm * config.coefficient_scale / math.sqrt(num_templates)


class RecastModel(QuantizedBase, BaseTuner):
    """Creates a RECAST model from a pretrained transformers model (use ``peft.get_peft_model``).

    Every adapter (task) gets ``K x n x B`` coefficients per target module; templates are rebuilt from the base
    weights by closed-form Neural Mimicry whenever an adapter is injected (see :mod:`peft_recast.mimicry`), so adapter
    files hold coefficients only. The hooks below are PEFT's; grouping lives in :mod:`peft_recast.grouping`.

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
    """

    prefix: str = "recast_"
    tuner_layer_cls = RecastLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING

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
        requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        try:
            if low_cpu_mem_usage or not self._inject_like_existing(model, adapter_name):
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

    def _inject_like_existing(self, model: nn.Module, adapter_name: str) -> bool:
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
            and differing_field(other, config, GROUPING_FIELDS[:-1]) is None
        ), None)
        layers = adapter_layers(model, template) if template is not None else {}
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
        """Refuse an adapter whose saved ``base_fingerprint`` does not match this model's weights."""
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
        """Closed-form mimicry (or the template bank) for every group of ``adapter_name``; sets the config's
        ``base_fingerprint``, or checks it against this model's weights when the adapter is being loaded."""
        config = self.peft_config[adapter_name]
        layers = adapter_layers(model, adapter_name)
        problem = layers_to_transform_problem(model, config, layers)
        if problem is not None:
            raise ValueError(problem)
        groups = plan_groups(layers, config)
        warn_if_templates_exceed_groups(adapter_name, config, groups)
        numel = sum(layer.get_base_layer().weight.numel() for layer in layers.values())
        units_per_group = fuse_groups(groups, layers, config)
        bank = load_template_bank(config.template_bank) if config.template_bank is not None else None
        fingerprint, shared = {}, {} if config.coefficient_sharing == "position" else None
        for name, units in tqdm(
            units_per_group, desc="RECAST mimicry", unit="group", disable=numel < PROGRESS_MIN_NUMEL
        ):
            weights = [[member.pristine_weight() for _, member in unit] for unit in units]
            if any(weight.device.type == "meta" for unit in weights for weight in unit):
                raise ValueError(
                    f"The base weights of '{name}' are on the meta device. RECAST builds its templates from the "
                    "pretrained weights, so load the base model with real weights before adding a RECAST adapter."
                )
            fit = self._group_fit(weights, config.num_templates, [m.weight_state() for unit in units for _, m in unit])
            fingerprint[name] = fit.fingerprint()
            self._attach_units(adapter_name, config, name, units, fit, bank, shared)
        if config.base_fingerprint is not None:
            self._check_fingerprint(adapter_name, config, fingerprint)
        config.base_fingerprint = fingerprint

    def _group_fit(self, weights: list[list[torch.Tensor]], num_templates: int, states: list[tuple]) -> GroupFit:
        """Closed-form mimicry of one group's (units of) weights, fitted once: a later adapter with the same grouping
        reuses the fit (and so its templates and mixing) as long as none of the weights changed (``states``: each
        member's ``weight_state()``, storage and version counter, so an in-place change or a merge refits)."""
        key = (num_templates, tuple(states), tuple((w.dtype, w.shape) for unit in weights for w in unit))
        fits = self.__dict__.setdefault("_group_fits", {})
        if key not in fits:
            fits[key] = fit_group([unit[0] if len(unit) == 1 else flat_cat(unit) for unit in weights], num_templates)
        return fits[key]

    @staticmethod
    def _attach_units(
        adapter_name: str,
        config: RecastConfig,
        name: str,
        units: list[list[tuple[str, RecastLayer]]],
        fit: GroupFit,
        bank: Optional[TemplateBank],
        shared: Optional[dict[tuple[str, int], RecastLayer]] = None,
    ) -> None:
        """Give every module of one group its basis ``B``, mixing ``R`` and (replacement form) ``alpha_0``; with
        ``shared`` (``coefficient_sharing="position"``), the unit at position ``j`` of a role ties its coefficients to
        the first such unit's (kept in ``shared``, by role and position).

        With ``u_l`` = :func:`_coefficient_unit` (``s ||W_l||_F / sqrt(n)``). Closed form: ``B`` = the members'
        pretrained weights, ``R_l = u_l M`` (residual) or ``M`` with ``alpha_0 = C_l = M^T[l] s^2`` (replace). Bank:
        ``B`` = the stored templates, ``R_l = diag(u_l / ||T_k||)`` (residual: coefficients on the closed form's
        scale) or ``I`` with the bank's ``alpha_0`` (replace). ``W_l`` of fused units is the concatenation of its roles' weights; the
        roles after the first share the first one's coefficient tensor.
        """
        replace_form = config.weight_form == "replace"
        if bank is None:
            roles = [RecastGroup(name, [unit[r][1] for unit in units]) for r in range(len(units[0]))]
            coefficients = fit.mixing.T * fit.singular_values[: fit.num_templates] ** 2  # C = U_n diag(s_n), (m x n)
        else:
            keys = [[key for key, _ in unit] for unit in units]
            entry = bank.check(name, keys, fit.fingerprint(), config.num_templates)
            stacked = torch.stack(
                [flat_cat([layer.pristine_weight() for _, layer in unit]).float().cpu() for unit in units]
            )
            error = ((entry.reconstruction() - stacked).norm() / stacked.norm()).item()
            templates, offset, roles = entry.templates, 0, []
            for r in range(len(units[0])):
                shape = tuple(units[0][r][1].pristine_weight().shape)
                size = math.prod(shape)
                piece = templates[:, offset : offset + size].reshape(templates.shape[0], *shape)
                roles.append(BankGroup(name, [unit[r][1] for unit in units], piece, relative_error=error))
                offset += size
            template_norms = templates.double().norm(dim=1)
        for j, unit in enumerate(units):
            norm = fit.member_norms[j]
            initial = None
            if bank is None:
                mixing = fit.mixing if replace_form else fit.mixing * _coefficient_unit(norm, config, len(fit.mixing))
                if replace_form:
                    initial = coefficients[j].expand(config.num_coefficient_sets, -1)
            elif replace_form:
                mixing = torch.eye(len(template_norms), dtype=torch.float64)
                alpha = entry.coefficients[j]
                initial = alpha if alpha.shape[0] == config.num_coefficient_sets else alpha.mean(0).expand(
                    config.num_coefficient_sets, -1
                )
            else:
                mixing = torch.diag(_coefficient_unit(norm, config, len(template_norms)) / template_norms)
            owner = unit[0][1]
            if shared is not None:
                owner = shared.setdefault((role_and_index(unit[0][0], config.layers_pattern)[0], j), owner)
            for r, (_, member) in enumerate(unit):
                member.attach_group(adapter_name, roles[r], mixing, initial=initial, replace=replace_form)
                if member is not owner:
                    member.tie_coefficients(adapter_name, owner)

    def plan_units(
        self, model: nn.Module, adapter_name: str
    ) -> list[tuple[str, list[list[tuple[str, RecastLayer]]]]]:
        """The template groups of ``adapter_name``: per group its units (one ``(key, layer)`` per fused role)."""
        layers, config = adapter_layers(model, adapter_name), self.peft_config[adapter_name]
        return fuse_groups(plan_groups(layers, config), layers, config)

    @staticmethod
    def _check_target_module_exists(peft_config: RecastConfig, key: str) -> Union[bool, re.Match, None]:
        """PEFT's matching, plus ``layers_to_transform`` for a regex ``target_modules`` (PEFT applies it to lists of
        names only, so a regex would silently adapt every layer)."""
        found = check_target_module_exists(peft_config, key)
        wanted = config_list(peft_config.layers_to_transform)
        if found and isinstance(peft_config.target_modules, str) and wanted:
            return layer_index(key, peft_config.layers_pattern) in wanted
        return found

    def _prepare_adapter_config(self, peft_config: RecastConfig, model_config: dict) -> RecastConfig:
        """Resolve a preset's target (and fused) modules for this model type, then PEFT's defaults."""
        if getattr(peft_config, "preset", None) is not None and peft_config.target_modules is None:
            for name, value in preset_fields(peft_config.preset, model_config).items():
                if name == "target_modules" or getattr(peft_config, name) is None:
                    setattr(peft_config, name, value)
        return super()._prepare_adapter_config(peft_config, model_config)

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

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` whose update is ``sum_i weights[i] * delta_W(adapters[i])`` exactly (task arithmetic;
        see :func:`peft_recast.adapters.add_weighted_adapter`). The adapters need one grouping and the
        residual form; the new adapter is not made active."""
        from .adapters import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name)

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
        :func:`~peft_recast.adapters.shared_coefficient_keys`): PEFT's key format, fewer header entries."""
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
        """PEFT's key remapping (a shared coefficient tensor saved once fills every module that shares it), then a
        check of the coefficients before they are loaded: a missing, unexpected, misshapen, non-float or non-finite
        coefficient tensor raises ``ValueError`` and removes the adapter again."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = adapter_layers(model, adapter_name)
        state_dict = fill_shared_coefficients(layers, adapter_name, state_dict)
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
        original_adapter_names = list(adapter_names)
        num_beams = kwargs.get("num_beams", None)
        uses_beam_search = isinstance(num_beams, int) and num_beams > 1
        if uses_beam_search:
            # generate() repeats every input num_beams times (the encoder of an encoder-decoder model excepted)
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        wrapped = (RecastLayer, AuxiliaryTrainingWrapper)  # + modules_to_save / trainable tokens
        handles = []
        for module in self.modules():
            if isinstance(module, wrapped):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _get_encoder(self.model)
        if uses_beam_search and encoder is not None:
            for module in encoder.modules():
                if isinstance(module, wrapped):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=original_adapter_names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model, else ``None`` (transformers 5 returns the model itself)."""
    if not hasattr(model, "get_encoder"):
        return None
    encoder = model.get_encoder()
    return None if encoder is model else encoder
