"""Template banks: the file that stores templates learned by gradient Neural Mimicry for one base model.

Templates from :mod:`peft_recast.gradient_mimicry` are not a function of the base weights, so they are stored once
per base model in a *template bank*: one safetensors file holding, per group, the templates ``(n, d)`` and the
mimicked coefficients ``(m, K, n)``, plus the group's member modules, a fingerprint of its base weights and the
:class:`MimicrySettings` that learned them. Every adapter names its bank in ``RecastConfig.template_bank``; adapter
files keep holding coefficients only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import safetensors
import safetensors.torch
import torch

from .files import atomic_write
from .mimicry import fingerprint_mismatch
from .presets import MimicrySettings

BANK_FILE = "recast_template_bank.safetensors"
BANK_FORMAT = "recast_template_bank"
BANK_VERSION = "1"


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
