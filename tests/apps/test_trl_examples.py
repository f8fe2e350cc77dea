"""The TRL examples at a tiny size: ``examples/trl_sft.py`` (``SFTTrainer`` with a chat template that adds tokens) and
``examples/trl_grpo.py`` (``GRPOTrainer``), both with ``peft_config=RecastConfig(...)`` on a tiny Llama built on the
spot. Each script's ``main`` runs in this process (it returns what it prints), so RECAST's warnings fail the test."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [
    # TRL 1.16 sets `gradient_checkpointing` and calls `gradient_checkpointing_enable/disable`, which transformers 5
    # deprecates in favour of `activation_checkpointing`: TRL's to change, not ours
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated:FutureWarning"),
    # the chat template grows the vocabulary, so PEFT saves the resized embeddings with the adapter (as for LoRA)
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_loss_falls_and_adapter_with_new_tokens_reloads(tmp_path, capsys):
    result = _example("trl_sft").main(
        ["--output-dir", str(tmp_path), "--hidden", "32", "--layers", "2", "--steps", "16", "--batch-size", "8"]
    )
    losses = result["losses"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    # q/v of 2 layers (one template group per role) x 2 templates x 2 row blocks
    assert sum(c.numel() for c in result["coefficients"].values()) == 16
    assert all(c.abs().sum() > 0 for c in result["coefficients"].values())  # every coefficient tensor trained
    # TRL added <|im_start|>, <|im_end|> (100, 101) and padded the vocabulary to 128 with dummy tokens
    assert result["chat_token_ids"] == [100, 101]
    assert result["new_token_ids"] == list(range(100, 128))
    moved = (result["trained_rows"] - result["initial_rows"]).norm(dim=1)
    assert (moved[:2] > 1e-3).all()  # the chat tokens occur in every example: their rows trained
    assert torch.equal(result["reloaded_rows"], result["trained_rows"])
    assert result["logits_difference"] == 0.0
    tensors = load_file(Path(result["adapter_dir"]) / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (28, 32)
    assert "loss: " in capsys.readouterr().out


def test_grpo_trains_coefficients_only_and_adapter_reloads(tmp_path):
    result = _example("trl_grpo").main(
        ["--output-dir", str(tmp_path), "--hidden", "32", "--layers", "2", "--steps", "3", "--completion-length", "8"]
    )
    assert result["trainable"] and all("recast_coefficients" in name for name in result["trainable"])
    assert result["frozen_unchanged"]
    assert any(c.abs().sum() > 0 for c in result["coefficients"].values())  # GRPO's gradient reached them
    assert len(result["rewards"]) == 3 and all(0 <= r <= 1 for r in result["rewards"])
    assert result["kl"][-1] > 0  # the reference (adapter disabled) differs from the trained policy
    assert result["logits_difference"] == 0.0
