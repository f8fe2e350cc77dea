"""Tiny random transformers models for PEFT's model tests, built from configs and put into a local Hugging Face cache.

PEFT's decoder / encoder-decoder / feature-extraction tests load tiny models by Hub id (``peft-internal-testing/...``).
The Hub is not reachable from CI, so every id they need is built here from a small config (fixed seed, same
architecture as the Hub model, same ``model_type`` so that PEFT's default ``target_modules`` apply; BERT-, GPT-2- and
Llama-like shapes come from ``tests/models.py``, the builders of RECAST's own tests) and written into a
private Hugging Face hub cache (``$PEFT_RECAST_CACHE/hf-hub``, standard ``models--org--name/{refs,snapshots}`` layout).
The tests then run with ``HF_HUB_OFFLINE=1`` and resolve the ids from that cache exactly as they would after a download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

# Bump when the recipes below change: the cache entries are rebuilt.
RECIPE_VERSION = "3"


def _decoder_common(**kwargs):
    # pad id outside the ids the tests feed (1, 2): a padding_idx row is all zeros, which would make a model without
    # position embeddings (Llama, Qwen2, Gemma3) blind to its inputs
    return {"vocab_size": 1024, "pad_token_id": 1023, "bos_token_id": 0, "eos_token_id": 2, **kwargs}


def _recipes() -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as tf

    # the shapes of the tiny models of RECAST's own tests (tests/models.py), at 2 layers and a 1024-token vocabulary
    from tests.models import bert_kwargs, gpt2_kwargs, llama_kwargs

    def causal(config_cls, **kwargs):
        return lambda: tf.AutoModelForCausalLM.from_config(config_cls(**kwargs))

    def seq2seq(config_cls, **kwargs):
        return lambda: tf.AutoModelForSeq2SeqLM.from_config(config_cls(**kwargs))

    def encoder(config_cls, **kwargs):
        return lambda: tf.AutoModel.from_config(config_cls(**kwargs))

    opt = dict(
        hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=4, max_position_embeddings=64,
        word_embed_proj_dim=16, **_decoder_common(),
    )  # fmt: skip
    gpt2_like = gpt2_kwargs(layers=2, **_decoder_common())
    llama_like = llama_kwargs(layers=2, hidden=16, **_decoder_common())
    bert_like = bert_kwargs(layers=2, vocab_size=1024, intermediate_size=37, type_vocab_size=2, pad_token_id=0)
    return {
        # decoder models (test_decoder_models.py)
        "peft-internal-testing/tiny-random-OPTForCausalLM": causal(tf.OPTConfig, **opt),
        "peft-internal-testing/tiny-random-GPT2LMHeadModel": causal(tf.GPT2Config, **gpt2_like),
        "hf-internal-testing/tiny-random-gpt2": causal(tf.GPT2Config, **gpt2_like),
        "peft-internal-testing/tiny-random-GPTJForCausalLM": causal(tf.GPTJConfig, rotary_dim=4, **gpt2_like),
        "trl-internal-testing/tiny-random-LlamaForCausalLM": causal(tf.LlamaConfig, **llama_like),
        "peft-internal-testing/tiny-dummy-qwen2": causal(tf.Qwen2Config, **llama_like),
        "hf-internal-testing/tiny-random-MistralForCausalLM": causal(tf.MistralConfig, **llama_like),
        "hf-internal-testing/tiny-random-Gemma3ForCausalLM": causal(
            tf.Gemma3TextConfig, head_dim=8, sliding_window=16, **llama_like
        ),
        # encoder-decoder models (test_encoder_decoder_models.py)
        "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": seq2seq(
            tf.T5Config, vocab_size=1024, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ),  # fmt: skip
        "peft-internal-testing/tiny-random-BartForConditionalGeneration": seq2seq(
            tf.BartConfig, vocab_size=1024, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
        ),  # fmt: skip
        # feature-extraction models (test_feature_extraction_models.py)
        "peft-internal-testing/tiny-random-BertModel": encoder(tf.BertConfig, **bert_like),
        # test_custom_models.py loads "bert-base-uncased" for a SEQ_CLS modules_to_save test; a tiny BERT stands in
        "bert-base-uncased": encoder(tf.BertConfig, **bert_like),
        "peft-internal-testing/tiny-random-RobertaModel": encoder(tf.RobertaConfig, **{**bert_like, "pad_token_id": 1}),
        "peft-internal-testing/tiny-random-DebertaModel": encoder(tf.DebertaConfig, **bert_like),
        "peft-internal-testing/tiny-random-DebertaV2Model": encoder(tf.DebertaV2Config, **bert_like),
    }


def hub_cache_dir(cache_root: Path) -> Path:
    return cache_root / "hf-hub"


def _commit_hash(model_id: str) -> str:
    return hashlib.sha1(f"peft-recast-tiny:{RECIPE_VERSION}:{model_id}".encode()).hexdigest()


def _write_entry(hub_cache: Path, repo_id: str, revision: str, write_files: Callable[[Path], None]) -> None:
    """Write one repo revision into ``hub_cache`` in huggingface_hub's cache layout (atomic per revision)."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = _commit_hash(f"{repo_id}@{revision}")
    snapshot = repo_dir / "snapshots" / commit
    ref = repo_dir / "refs" / revision
    if snapshot.is_dir() and ref.is_file() and ref.read_text().strip() == commit:
        return
    repo_dir.mkdir(parents=True, exist_ok=True)
    (repo_dir / "snapshots").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo_dir) as tmp:
        staging = Path(tmp) / "snapshot"
        staging.mkdir()
        write_files(staging)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        staging.rename(snapshot)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def ensure_tiny_models(cache_root: Path) -> Path:
    """Build every tiny model (once; cached across runs) and return the hub cache directory."""
    hub_cache = hub_cache_dir(cache_root)
    hub_cache.mkdir(parents=True, exist_ok=True)
    for model_id, build in _recipes().items():

        def write(path: Path, build=build, model_id=model_id) -> None:
            seed = int(hashlib.sha1(model_id.encode()).hexdigest()[:8], 16)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = build()
            model.save_pretrained(path)

        _write_entry(hub_cache, model_id, "main", write)

    # test_config.py: a LoRA adapter repository with a non-default revision ("test"), as on the Hub.
    def write_lora_adapter(path: Path) -> None:
        from peft import LoraConfig

        LoraConfig(
            base_model_name_or_path="peft-internal-testing/tiny-random-OPTForCausalLM",
            target_modules=["q_proj", "v_proj"], r=8, lora_alpha=32, task_type="CAUSAL_LM",
        ).save_pretrained(path)  # fmt: skip

    _write_entry(hub_cache, "peft-internal-testing/tiny-opt-lora-revision", "test", write_lora_adapter)
    return hub_cache


def configure_offline_hub(hub_cache: Path) -> None:
    """Point huggingface_hub / transformers at ``hub_cache`` and switch them offline (also if already imported)."""
    os.environ["HF_HUB_CACHE"] = str(hub_cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub.constants as hf_constants

    hf_constants.HF_HUB_CACHE = str(hub_cache)
    hf_constants.HUGGINGFACE_HUB_CACHE = str(hub_cache)
    hf_constants.HF_HUB_OFFLINE = True
    try:
        import huggingface_hub.file_download as file_download

        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            if hasattr(file_download, name):
                setattr(file_download, name, str(hub_cache))
    except ImportError:
        pass
    try:
        import transformers.utils.hub as tf_hub

        for name in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE", "PYTORCH_TRANSFORMERS_CACHE"):
            if hasattr(tf_hub, name):
                setattr(tf_hub, name, str(hub_cache))
    except ImportError:
        pass
    json.dumps({})  # keep json imported for callers that extend this module
