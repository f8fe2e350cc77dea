"""One method's model on the benchmark (every task's adapter on one encoder), and a run's saved files."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ...files import atomic_write
from ..encoder import load_encoder
from .methods import Method


class MethodModel:
    """One method's model: a single encoder holding every task's adapter (``full``: a fresh copy per run)."""

    def __init__(self, method: Method, device: torch.device) -> None:
        self.method, self.device = method, device
        self.encoder: Optional[nn.Module] = None
        self.heads: dict[str, nn.Module] = {}

    def _base(self) -> nn.Module:
        return load_encoder(self.device)

    def new_adapter(self, name: str) -> nn.Module:
        """The encoder with a fresh adapter ``name`` added and made the only active (and trainable) one."""
        if self.method.kind == "full":
            encoder = self._base()
            encoder.requires_grad_(True)
            return encoder
        if self.method.kind == "probe":
            self.encoder = self.encoder or self._base()
            return self.encoder
        if self.encoder is None:
            import peft

            self.encoder = peft.get_peft_model(self._base(), self.method.config(), adapter_name=name)
        else:
            self.encoder.add_adapter(name, self.method.config())
            self.encoder.set_adapter(name)
        return self.encoder

    def load_adapter(self, name: str, path: str) -> nn.Module:
        """Reload a saved adapter (a resumed benchmark) into the shared encoder; ``full``: a model from ``path``."""
        if self.method.kind == "full":
            from transformers import AutoModel

            return AutoModel.from_pretrained(path).to(self.device)
        if self.method.kind == "probe":
            self.encoder = self.encoder or self._base()
            return self.encoder
        if self.encoder is None:
            from peft import PeftModel

            self.encoder = PeftModel.from_pretrained(self._base(), path, adapter_name=name)
        else:
            self.encoder.load_adapter(path, adapter_name=name)
        return self.encoder

    def activate(self, name: str) -> nn.Module:
        if self.method.kind == "peft":
            self.encoder.set_adapter(name)
        return self.encoder


def adapter_bytes(path: str) -> int:
    """Bytes of the adapter's safetensors files in a run folder (the head not counted)."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors") and f != "head.safetensors"]
    return sum(os.path.getsize(os.path.join(path, f)) for f in files)


def save_run(encoder: nn.Module, head: nn.Module, method: Method, path: str) -> int:
    """Save the run's adapter (PEFT methods: the active one; full fine-tuning: the model) and its head into
    ``path``; returns the adapter's bytes on disk (0 for the probe)."""
    from safetensors.torch import save

    os.makedirs(path, exist_ok=True)
    if method.kind == "peft":
        encoder.save_pretrained(path, selected_adapters=[encoder.active_adapter])
        # PEFT saves non-default adapters in a sub-folder named after the adapter; keep one flat folder per run
        nested = os.path.join(path, encoder.active_adapter)
        if os.path.isdir(nested):
            for name in os.listdir(nested):
                os.replace(os.path.join(nested, name), os.path.join(path, name))
            os.rmdir(nested)
    elif method.kind == "full":
        encoder.save_pretrained(path)
    with atomic_write(os.path.join(path, "head.safetensors"), "wb") as handle:
        handle.write(save({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}))
    return adapter_bytes(path) if method.kind != "probe" else 0


def load_head(path: str, device: torch.device) -> nn.Linear:
    """The head saved by :func:`save_run`, its size read from the file."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "head.safetensors"), device=str(device))
    num_classes, hidden = state["weight"].shape
    head = nn.Linear(hidden, num_classes).to(device)
    head.load_state_dict(state)
    return head
