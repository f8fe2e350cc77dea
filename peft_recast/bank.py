"""Gradient Neural Mimicry, as in the paper, and the template banks it produces.

The paper (Tasnim & Plummer, ICLR 2025; official code ``appledora/RECAST_ICLR25``, notebooks
``reconstruction-*.ipynb``) learns, for every group of ``m`` modules, ``n`` templates ``T`` (``n x d``) and ``K``
coefficient sets per module (``C``: ``m x K x n``) by gradient descent on the weights alone (no data):

    W_gen_l = mean_K(C_l + noise) @ T                                   (d,)
    loss    = sum_groups sum_l  lambda * SmoothL1_beta(W_gen_l, W_pre_l)  (mean over the d entries)

with RMSprop (lr 0.1), ``StepLR(200, 0.1)``, 1000 full-batch steps, gradient clipping at norm 1.0, coefficient noise
of std 1e-4 while training, templates initialised with ``kaiming_normal_``, each coefficient set with
``orthogonal_`` (a random unit vector) and the lowest-loss snapshot kept (ViT settings; ResNet-34: lr 0.2,
``StepLR(500, 0.1)``, 3000 steps, no noise). Numbers from ``shared/research/recast-paper.md`` §2.1.

Such templates are not a function of the base weights, so they are stored once per base model in a *template bank*
(one safetensors file: per group the templates ``(n, d)`` and the mimicked coefficients ``(m, K, n)``, plus the
group's member modules and a fingerprint of its base weights), which every adapter names in
``RecastConfig.template_bank``; adapter files keep holding coefficients only.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import RecastConfig
from .files import atomic_write
from .layer import RecastGroup, RecastLayer
from .mimicry import fingerprint_mismatch

BANK_FILE = "recast_template_bank.safetensors"
BANK_FORMAT = "recast_template_bank"
BANK_VERSION = "1"


@dataclass(frozen=True)
class MimicrySettings:
    """Hyper-parameters of gradient Neural Mimicry; the defaults are the official ViT settings (see module doc)."""

    steps: int = 1000
    lr: float = 0.1
    lr_step: int = 200
    lr_gamma: float = 0.1
    noise_std: float = 1e-4
    clip_norm: float = 1.0
    loss_weight: float = 2.0
    smooth_l1_beta: float = 1.0
    seed: int = 42

    @classmethod
    def resnet(cls, **kwargs: Any) -> "MimicrySettings":
        """The official ResNet-34 settings (lr 0.2, StepLR(500, 0.1), 3000 steps, no coefficient noise)."""
        return replace(cls(steps=3000, lr=0.2, lr_step=500, noise_std=0.0), **kwargs)

    def __post_init__(self) -> None:
        for name in ("steps", "lr_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("lr", "lr_gamma", "clip_norm", "loss_weight", "smooth_l1_beta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"`{name}` must be a positive finite number, got {getattr(self, name)!r}.")
        if not 0 <= self.noise_std < math.inf:
            raise ValueError(f"`noise_std` must be a finite number >= 0, got {self.noise_std!r}.")


@dataclass
class BankGroupEntry:
    """One group of a template bank.

    Attributes:
        templates: ``(n, d)`` float32, ``d`` = the numel of one (fused) member weight.
        coefficients: ``(m, K, n)`` float32, the mimicked coefficients ``alpha_0``.
        members: ``m`` lists of module keys (one per fused role, in order; one key when nothing is fused).
        shapes: the weight shape of each role.
        fingerprint: singular values of the group's stacked pretrained weights (as ``base_fingerprint``).
    """

    templates: torch.Tensor
    coefficients: torch.Tensor
    members: list[list[str]]
    shapes: list[list[int]]
    fingerprint: list[float]

    def reconstruction(self) -> torch.Tensor:
        """``mean_K(alpha_0) @ T``: the mimicked weights, ``(m, d)``."""
        return self.coefficients.mean(1) @ self.templates


@dataclass
class TemplateBank:
    """Templates learned by gradient mimicry for one base model, and how they were learned."""

    groups: dict[str, BankGroupEntry]
    settings: MimicrySettings
    num_templates: int
    num_coefficient_sets: int
    base_model_name_or_path: Optional[str] = None
    best_loss: float = float("nan")
    seconds: float = float("nan")
    source: Optional[str] = field(default=None, compare=False)

    def check(
        self, name: str, member_keys: list[list[str]], fingerprint: list[float], num_templates: int
    ) -> BankGroupEntry:
        """The entry of group ``name`` if it has these members, ``num_templates`` templates (as requested: the
        bank caps it at the group size) and the base weights match its fingerprint.

        Raises:
            ValueError: the bank has no such group, other members or template count, or was fitted to other base
                weights.
        """
        where = f"the template bank {self.source or ''}".rstrip()
        if num_templates != self.num_templates:
            raise ValueError(
                f"{where} has num_templates={self.num_templates} but the adapter asks for {num_templates}; use the "
                "RecastConfig the bank was made with."
            )
        if name not in self.groups:
            raise ValueError(
                f"{where} has no template group '{name}' (it has {sorted(self.groups)[:4]}...). A bank is fitted for "
                "one set of target modules and one grouping: use the RecastConfig it was made with, or make a new "
                "bank with `peft-recast mimic`."
            )
        entry = self.groups[name]
        if entry.members != member_keys:
            raise ValueError(
                f"Template group '{name}' of {where} holds modules {entry.members} but this adapter groups "
                f"{member_keys}; use the RecastConfig the bank was made with."
            )
        problem = fingerprint_mismatch({name: entry.fingerprint}, {name: fingerprint})
        if problem is not None:
            raise ValueError(
                f"{where} was fitted to another base model: {problem}. Templates only reproduce the weights they "
                f"were fitted to (bank made for base_model_name_or_path={self.base_model_name_or_path!r}); make a "
                "bank for this model with `peft-recast mimic`."
            )
        return entry


class BankGroup(RecastGroup):
    """A template group whose basis is a slice of stored bank templates (one fused role), shaped as its weights."""

    def __init__(
        self, name: str, members: list[RecastLayer], templates: torch.Tensor, relative_error: float = math.nan
    ) -> None:
        super().__init__(name, members)
        self.templates = templates  # (n, *weight shape), float32, CPU
        self.relative_error = relative_error  # ||mean_K(alpha_0) T - A||_F / ||A||_F of the whole group
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    def basis(self) -> list[torch.Tensor]:
        """The ``n`` templates on the device and in the dtype of the members' weights."""
        weight = self.members[0].pristine_weight()
        key = (weight.device, weight.dtype)
        if key not in self._cache:
            self._cache = {key: list(self.templates.to(device=weight.device, dtype=weight.dtype).unbind(0))}
        return self._cache[key]


def _template_shape(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The shape the paper gives one template: the weight's, rows concatenated for fused weights (``qkv``)."""
    if len(shapes) == 1:
        return tuple(shapes[0])
    if all(tuple(s[1:]) == tuple(shapes[0][1:]) for s in shapes):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (sum(math.prod(s) for s in shapes),)


def fit_bank(
    groups: dict[str, torch.Tensor],
    template_shapes: dict[str, tuple[int, ...]],
    num_templates: int,
    num_coefficient_sets: int,
    settings: MimicrySettings = MimicrySettings(),
    progress: bool = True,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Gradient Neural Mimicry of several groups at once (one optimiser, as in the paper: clipping is joint).

    Args:
        groups: per group the stacked pretrained weights ``A`` (``m x d``, any float dtype).
        template_shapes: per group the shape of one template (``prod = d``), used for the ``kaiming_normal_`` init.
        num_templates: ``n`` (capped at ``m`` per group).
        num_coefficient_sets: ``K``.

    Returns:
        ``({name: (templates (n x d), coefficients (m x K x n))}, best loss)``: the lowest-loss snapshot, float32.
        Deterministic for a given ``settings.seed`` (and thread count).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    targets, templates, coefficients = {}, {}, {}
    for name, stacked in groups.items():
        m = stacked.shape[0]
        n = min(num_templates, m)
        targets[name] = stacked.detach().float().cpu()
        bank = torch.empty((n, *template_shapes[name]))
        nn.init.kaiming_normal_(bank, generator=generator)
        templates[name] = nn.Parameter(bank.reshape(n, -1))
        sets = torch.empty(m, num_coefficient_sets, n, 1)
        for index in range(m * num_coefficient_sets):
            nn.init.orthogonal_(sets.view(-1, n, 1)[index], generator=generator)
        coefficients[name] = nn.Parameter(sets.squeeze(-1))
    parameters = [*templates.values(), *coefficients.values()]
    optimizer = torch.optim.RMSprop(parameters, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.lr_step, gamma=settings.lr_gamma)
    best_loss, best = math.inf, None
    bar = tqdm(range(settings.steps), desc="RECAST gradient mimicry", unit="step", disable=not progress)
    for step in bar:
        loss = torch.zeros(())
        for name, target in targets.items():
            sets = coefficients[name]
            if settings.noise_std > 0:
                sets = sets + settings.noise_std * torch.randn(sets.shape, generator=generator)
            generated = sets.mean(1) @ templates[name]
            per_layer = F.smooth_l1_loss(generated, target, reduction="none", beta=settings.smooth_l1_beta).mean(1)
            loss = loss + settings.loss_weight * per_layer.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        if value < best_loss:
            best_loss = value
            best = {name: (templates[name].detach().clone(), coefficients[name].detach().clone()) for name in targets}
        nn.utils.clip_grad_norm_(parameters, settings.clip_norm)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == settings.steps - 1:
            bar.set_postfix(loss=f"{value:.3e}")
    return best, best_loss


def mimic_template_bank(
    model: nn.Module,
    config: RecastConfig,
    settings: MimicrySettings = MimicrySettings(),
    progress: bool = True,
) -> TemplateBank:
    """Fit a template bank to ``model`` (a transformers / torch model, left unchanged) for ``config``'s groups.

    The groups are exactly those an adapter with ``config`` gets (targets, presets, grouping, fused modules), so any
    adapter made with the same grouping fields and ``template_bank=<this bank>`` uses it.
    """
    from peft import get_peft_model

    from .model import RecastModel

    start = time.perf_counter()
    probe = replace(config, template_bank=None, base_fingerprint=None, inference_mode=True)
    peft_model = get_peft_model(model, probe, adapter_name="recast_mimicry")
    try:
        tuner: RecastModel = peft_model.base_model
        stacked, shapes, entries = {}, {}, {}
        for name, units in tuner.plan_units(model, "recast_mimicry"):
            weights = [[layer.pristine_weight().detach() for _, layer in unit] for unit in units]
            stacked[name] = torch.stack([torch.cat([w.reshape(-1).float() for w in unit]) for unit in weights])
            shapes[name] = _template_shape([list(w.shape) for w in weights[0]])
            entries[name] = ([[key for key, _ in unit] for unit in units], [list(w.shape) for w in weights[0]])
        fitted, best_loss = fit_bank(
            stacked, shapes, config.num_templates, config.num_coefficient_sets, settings, progress=progress
        )
        fingerprint = probe.base_fingerprint
    finally:
        peft_model.unload()
    groups = {
        name: BankGroupEntry(
            templates=fitted[name][0],
            coefficients=fitted[name][1],
            members=entries[name][0],
            shapes=entries[name][1],
            fingerprint=fingerprint[name],
        )
        for name in stacked
    }
    return TemplateBank(
        groups=groups,
        settings=settings,
        num_templates=config.num_templates,
        num_coefficient_sets=config.num_coefficient_sets,
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
        best_loss=best_loss,
        seconds=time.perf_counter() - start,
    )


def save_template_bank(bank: TemplateBank, path: str) -> str:
    """Write ``bank`` atomically as safetensors; ``path`` is a directory (gets :data:`BANK_FILE`) or a file name.

    Returns the file written.
    """
    if not path.endswith(".safetensors"):
        path = os.path.join(path, BANK_FILE)
    tensors, groups = {}, {}
    for name, entry in bank.groups.items():
        tensors[f"{name}.templates"] = entry.templates.detach().float().cpu().contiguous()
        tensors[f"{name}.coefficients"] = entry.coefficients.detach().float().cpu().contiguous()
        groups[name] = {"members": entry.members, "shapes": entry.shapes, "fingerprint": entry.fingerprint}
    metadata = {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "groups": json.dumps(groups),
        "settings": json.dumps(asdict(bank.settings)),
        "num_templates": str(bank.num_templates),
        "num_coefficient_sets": str(bank.num_coefficient_sets),
        "base_model_name_or_path": bank.base_model_name_or_path or "",
        "best_loss": repr(bank.best_loss),
        "seconds": repr(bank.seconds),
    }
    with atomic_write(path, "wb") as handle:
        handle.write(safetensors.torch.save(tensors, metadata=metadata))
    return path


def resolve_template_bank(path_or_id: str) -> str:
    """The local file of a bank given as a file, a directory holding :data:`BANK_FILE`, or a Hub repo id
    (``huggingface_hub.hf_hub_download``; with ``HF_HUB_OFFLINE=1`` it answers from the local cache)."""
    if os.path.isfile(path_or_id):
        return path_or_id
    if os.path.isdir(path_or_id):
        candidate = os.path.join(path_or_id, BANK_FILE)
        if not os.path.isfile(candidate):
            raise ValueError(f"The directory {path_or_id!r} holds no RECAST template bank ({BANK_FILE}).")
        return candidate
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=path_or_id, filename=BANK_FILE)
    except Exception as error:  # not a local path and not (or not reachably) on the Hub
        raise ValueError(
            f"Cannot find the RECAST template bank {path_or_id!r}: it is neither a local file or directory nor "
            f"a Hub repository with {BANK_FILE} in reach ({type(error).__name__}: {error})."
        ) from error


_LOADED: dict[tuple[str, int, float], TemplateBank] = {}


def load_template_bank(path_or_id: str) -> TemplateBank:
    """Read a template bank (see :func:`resolve_template_bank`); cached per file, size and modification time.

    Raises:
        ValueError: the file cannot be found, is not a safetensors template bank, or is damaged.
    """
    path = resolve_template_bank(path_or_id)
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime)
    if key in _LOADED:
        return _LOADED[key]
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != BANK_FORMAT:
                raise ValueError("its metadata does not name it a RECAST template bank")
            if metadata.get("version") != BANK_VERSION:
                raise ValueError(
                    f"it has version {metadata.get('version')!r}, this peft_recast reads version {BANK_VERSION}; "
                    "upgrade peft_recast"
                )
            described = json.loads(metadata["groups"])
            groups = {
                name: BankGroupEntry(
                    templates=handle.get_tensor(f"{name}.templates"),
                    coefficients=handle.get_tensor(f"{name}.coefficients"),
                    members=info["members"],
                    shapes=info["shapes"],
                    fingerprint=info["fingerprint"],
                )
                for name, info in described.items()
            }
            bank = TemplateBank(
                groups=groups,
                settings=MimicrySettings(**json.loads(metadata["settings"])),
                num_templates=int(metadata["num_templates"]),
                num_coefficient_sets=int(metadata["num_coefficient_sets"]),
                base_model_name_or_path=metadata.get("base_model_name_or_path") or None,
                best_loss=float(metadata.get("best_loss", "nan")),
                seconds=float(metadata.get("seconds", "nan")),
                source=path_or_id,
            )
    except ValueError as error:
        raise ValueError(f"Cannot load the RECAST template bank {path!r}: {error}.") from error
    except Exception as error:  # safetensors raises its own types for truncated or corrupted files
        raise ValueError(
            f"Cannot load the RECAST template bank {path!r}: the file is damaged or not safetensors "
            f"({type(error).__name__}: {error}). Write it again with `peft-recast mimic`."
        ) from error
    for name, entry in groups.items():
        m, d = len(entry.members), sum(math.prod(shape) for shape in entry.shapes)
        if entry.templates.ndim != 2 or entry.templates.shape[1] != d or entry.coefficients.shape[0] != m:
            raise ValueError(
                f"Cannot load the RECAST template bank {path!r}: group '{name}' has templates of shape "
                f"{tuple(entry.templates.shape)} and coefficients of shape {tuple(entry.coefficients.shape)} for "
                f"{m} modules of {d} weights; the file is damaged."
            )
        if not (torch.isfinite(entry.templates).all() and torch.isfinite(entry.coefficients).all()):
            raise ValueError(
                f"Cannot load the RECAST template bank {path!r}: group '{name}' holds NaN or infinite values; the "
                "file is damaged or its mimicry diverged. Write it again with `peft-recast mimic`."
            )
    _LOADED[key] = bank
    return bank
