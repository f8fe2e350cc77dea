"""``peft-recast train --data``, ``evaluate`` and ``predict`` on one's own files; bad input exits 2 and writes nothing;
the saved adapter is a plain PEFT adapter of the base model."""

from __future__ import annotations

import io
import json
import random

import pandas
import pytest
import torch

from peft_recast.apps import cli, textdata
from peft_recast.apps.textdata import UsageError

from ..helpers import MINILM_MODULE

SPAM = ["free prize, call now", "you won a cruise, reply yes", "claim your cash reward today", "urgent: your account won",
        "win a new phone, text WIN", "cheap loans, click here", "you are selected for a prize", "bonus cash waiting"]
HAM = ["see you at lunch", "running late, sorry", "dinner at eight?", "thanks for the notes", "call me when you land",
       "the meeting moved to noon", "can you pick up milk", "happy birthday, mum"]


def _rows(count: int, seed: int) -> list[dict]:
    generator = random.Random(seed)
    rows = []
    for i in range(count):
        label = "spam" if i % 2 else "ham"
        text = generator.choice(SPAM if label == "spam" else HAM)
        rows.append({"message": f"{text} {generator.randint(1, 99)}", "kind": label})
    return rows


@pytest.fixture()
def own_files(tmp_path):
    pandas.DataFrame(_rows(80, 0)).to_csv(tmp_path / "train.csv", index=False)
    with open(tmp_path / "test.jsonl", "w") as handle:
        for row in _rows(24, 1):
            handle.write(json.dumps(row) + "\n")
    return tmp_path


@pytest.mark.requires_modules(MINILM_MODULE)
def test_train_evaluate_predict_on_own_csv(own_files, capsys, monkeypatch):
    from peft import AutoPeftModel, PeftModel
    from transformers import AutoModel

    from peft_recast.apps.encoder import load_classifier, minilm_path

    run = own_files / "run"
    assert cli.main(["train", "--data", str(own_files / "train.csv"), "--text-column", "message", "--label-column",
                     "kind", "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--output-dir", str(run),
                     "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train: 72 training examples, 48 coefficients + 770 head parameters at lr 0.01" in printed
    assert "epoch 2/2: validation accuracy" in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "task.json"):
        assert (run / "adapter" / name).is_file(), name
    record = json.loads((run / "adapter" / "task.json").read_text())
    assert record["classes"] == ["ham", "spam"] and record["text_column"] == "message"
    results = json.loads((run / "results.json").read_text())
    assert results["validation_examples"] == 8 and len(results["validation_accuracy_per_epoch"]) == 2

    # a plain PEFT adapter of the base model: PeftModel, AutoPeftModel and transformers' load_adapter all take it
    classifier, _ = load_classifier(str(run / "adapter"), torch.device("cpu"))
    batch = dict(input_ids=torch.tensor([[101, 2489, 3396, 102]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    expected = classifier.encoder(**batch).last_hidden_state
    plain = AutoModel.from_pretrained(minilm_path())
    reference = plain(**batch).last_hidden_state
    loaded = [PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path()), str(run / "adapter")),
              AutoPeftModel.from_pretrained(str(run / "adapter"))]
    plain.load_adapter(str(run / "adapter"))
    for model in [*loaded, plain]:
        torch.testing.assert_close(model(**batch).last_hidden_state, expected, rtol=0, atol=0)
    assert not torch.equal(expected, reference)  # the adapter trained

    # evaluate on a JSON lines file: accuracy, macro-F1, confusion matrix as text and PNG
    report = own_files / "report"
    assert cli.main(["evaluate", str(run), "--data", str(own_files / "test.jsonl"), "--output-dir", str(report),
                     "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "on 24 examples" in printed and "true \\ predicted" in printed
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert sum(map(sum, evaluation["confusion_matrix"])) == 24
    assert (report / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # predict: a file to a JSON lines file, and standard input to standard output; same labels as evaluate counted
    output = own_files / "predictions.jsonl"
    assert cli.main(["predict", str(run), "--data", str(own_files / "test.jsonl"), "--output", str(output),
                     "--threads", "1"]) == 0
    predictions = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(predictions) == 24 and {p["label"] for p in predictions} <= {"ham", "spam"}
    assert all(0.5 <= p["probability"] <= 1.0 for p in predictions)
    truth = [json.loads(line)["kind"] for line in (own_files / "test.jsonl").read_text().splitlines()]
    correct = sum(p["label"] == t for p, t in zip(predictions, truth))
    assert correct / 24 == pytest.approx(evaluation["accuracy"])
    capsys.readouterr()
    texts = [json.loads(line)["message"] for line in (own_files / "test.jsonl").read_text().splitlines()]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))
    assert cli.main(["predict", str(run), "--data", "-", "--threads", "1"]) == 0
    from_stdin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in from_stdin] == [p["label"] for p in predictions]

    # a label the run never saw is refused, nothing written
    with open(own_files / "other.jsonl", "w") as handle:
        handle.write(json.dumps({"message": "hello", "kind": "phishing"}) + "\n")
    assert cli.main(["evaluate", str(run), "--data", str(own_files / "other.jsonl"), "--output-dir",
                     str(own_files / "nothing")]) == 2
    assert "'phishing' that the run was not trained on" in capsys.readouterr().err
    assert not (own_files / "nothing").exists()


def _write(path, text: str):
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing column": (lambda d: ["--data", _write(d / "a.csv", "body,label\nhi,a\nho,b\n")],
                       "has no column 'text' (its columns: 'body', 'label'); name the right one with --text-column"),
    "one class": (lambda d: ["--data", _write(d / "a.csv", "text,label\n" + "hi,a\n" * 40)],
                  "every example has the label 'a'; a classifier needs at least two classes"),
    "empty texts": (lambda d: ["--data", _write(d / "a.csv", "text,label\nhi,a\n,b\n  ,a\n")],
                    "2 example(s) have an empty 'text' (rows 2, 3, counting from 1)"),
    "missing labels": (lambda d: ["--data", _write(d / "a.csv", "text,label\nhi,a\nho,\n")],
                       "1 example(s) have no 'label' (first: row 2"),
    "unseen validation label": (
        lambda d: ["--data", _write(d / "a.csv", "text,label\n" + "hi,a\nho,b\n" * 20),
                   "--validation-data", _write(d / "v.csv", "text,label\nhey,c\n")],
        "has label(s) 'c' that the run was not trained on (its classes: 'a', 'b')"),
    "not what its extension says": (lambda d: ["--data", _write(d / "a.parquet", "text,label\nhi,a\n")],
                                    "is not a readable Parquet file"),
    "bad JSON lines": (lambda d: ["--data", _write(d / "a.jsonl", "{\"text\": \"hi\", \"label\": 1}\nnot json\n")],
                       "is not a readable JSON lines file"),
    "unknown extension": (lambda d: ["--data", _write(d / "a.xlsx", "x")], "unknown file type '.xlsx'"),
    "missing file": (lambda d: ["--data", str(d / "nowhere.csv")], "nowhere.csv: no such file or folder"),
    "task and data": (lambda d: ["--task", "sms", "--data", _write(d / "a.csv", "text,label\nhi,a\n")],
                      "give either --task (a built-in task) or --data (your own file), not both"),
    "too few to split": (lambda d: ["--data", _write(d / "a.csv", "text,label\nhi,a\nho,b\n")],
                         "2 examples are too few to cut a validation split of 8"),
    "no default targets": (lambda d: ["--model", _funnel(d), "--data", _write(d / "a.csv", "text,label\nhi,a\n")],
                           "model type 'funnel' has no default target modules; pass --target-modules"),
    "unknown preset": (lambda d: ["--preset", "ladder-7", "--data", _write(d / "a.csv", "text,label\nhi,a\n")],
                       "--preset ladder-7"),
}


def _funnel(folder) -> str:
    from transformers import FunnelConfig

    path = folder / "funnel"
    FunnelConfig(d_model=32, n_head=2, d_head=16, d_inner=64, vocab_size=100, block_sizes=[1, 1]).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    make, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    argv = ["train", *make(tmp_path), "--output-dir", str(out), "--threads", "1"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("peft-recast train: error: ") and "\n" not in error, error
    assert message in error, error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_readers_of_every_format(tmp_path):
    frame = pandas.DataFrame({"text": ["a b", "c d", "e f"], "label": [1, 0, 1]})
    frame.to_csv(tmp_path / "x.csv", index=False)
    frame.to_csv(tmp_path / "x.tsv", index=False, sep="\t")
    frame.to_json(tmp_path / "x.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "x.json", orient="records")
    frame.to_parquet(tmp_path / "x.parquet")
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(tmp_path / "saved"))
    for name in ("x.csv", "x.tsv", "x.jsonl", "x.json", "x.parquet", "saved"):
        examples = textdata.read_examples(str(tmp_path / name), "text", None, "label")
        assert examples.texts == ["a b", "c d", "e f"] and examples.labels == ["1", "0", "1"], name
    assert textdata.class_names(["10", "9", "1"], "x") == ["1", "9", "10"]  # integers in numeric order
    assert textdata.class_names(["b", "a", "b"], "x") == ["a", "b"]
    assert textdata.label_name(2.0) == "2" and textdata.label_name("2.5") == "2.5"
    plain = textdata.read_table("-", stdin=io.StringIO("first text\n\nsecond, with a comma\n"))
    assert plain["text"].tolist() == ["first text", "second, with a comma"]
    lines = textdata.read_table("-", stdin=io.StringIO('{"text": "x", "extra": 1}\n{"text": "y", "extra": 2}\n'))
    assert lines["text"].tolist() == ["x", "y"] and lines["extra"].tolist() == [1, 2]
    with pytest.raises(UsageError, match="holds no examples"):
        textdata.read_table("-", stdin=io.StringIO("\n\n"))


def test_validation_split_is_seeded_and_disjoint():
    examples = textdata.TextExamples([f"t{i}" for i in range(100)], None, ["a", "b"] * 50)
    train, validation = textdata.split_validation(examples, seed=3)
    again = textdata.split_validation(examples, seed=3)
    assert len(validation) == 10 and len(train) == 90
    assert set(train.texts).isdisjoint(validation.texts) and set(train.texts) | set(validation.texts) == set(
        examples.texts)
    assert again[1].texts == validation.texts
    assert textdata.split_validation(examples, seed=4)[1].texts != validation.texts


@pytest.mark.requires_modules(MINILM_MODULE)
def test_a_folder_saved_before_the_head_had_its_own_file_still_loads(tmp_path):
    """Adapters written by earlier releases held the head under ``modules_to_save`` and keys under ``encoder.``."""
    from peft import get_peft_model

    from peft_recast import RecastConfig
    from peft_recast.apps.encoder import SentenceClassifier, load_classifier, load_encoder, task_record
    from peft_recast.files import atomic_write

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    old = get_peft_model(SentenceClassifier(load_encoder(cpu), 2, seed=5),
                         RecastConfig(target_modules=["query", "value"], modules_to_save=["classifier"],
                                      init_weights=False)).eval()
    old.save_pretrained(str(tmp_path), save_embedding_layers=False)
    with atomic_write(tmp_path / "task.json") as handle:
        json.dump(task_record("sms", ["ham", "spam"], 32), handle)
    loaded, _ = load_classifier(str(tmp_path), cpu)
    batch = dict(input_ids=torch.tensor([[101, 2489, 3396, 102]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), old(**batch), rtol=0, atol=0)


@pytest.mark.requires_modules(MINILM_MODULE)
def test_readme_own_data_example_runs_as_written(tmp_path):
    """README's "Your own data" block, run line by line in a folder holding a small reviews.csv and reviews-test.csv."""
    import re
    import subprocess
    import sys

    from ..helpers import REPO

    readme = (REPO / "README.md").read_text()
    block = re.search(r"### Your own data.*?```bash\n(.*?)```", readme, re.S).group(1)
    generator = random.Random(0)
    good, bad = ["works well, love it", "great sound and fast", "sturdy and cheap"], ["broke in a day", "stopped working",
                                                                                       "awful battery, returned it"]
    for name, count in (("reviews.csv", 60), ("reviews-test.csv", 12)):
        rows = [{"review": generator.choice(good if i % 2 else bad), "verdict": "good" if i % 2 else "bad"}
                for i in range(count)]
        pandas.DataFrame(rows).to_csv(tmp_path / name, index=False)
    import os

    venv = REPO / ".venv" / "bin"
    outputs = []
    for line in block.strip().splitlines():
        command = line.split("  #")[0].strip()
        command = command.replace(".venv/bin/python", sys.executable)
        command = command.replace(".venv/bin/peft-recast", f"{venv / 'peft-recast'}" if venv.exists() else "peft-recast")
        if "peft-recast" in command:
            command += " --threads 1"
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        outputs.append(done.stdout)
    assert len(outputs) == 4
    assert (tmp_path / "runs" / "reviews" / "test" / "confusion_matrix.png").exists()
    assert "macro-F1" in outputs[1]
    assert json.loads(outputs[2])["label"] in ("bad", "good")


def _tiny_encoder(kind: str, folder) -> tuple[str, list[str]]:
    """A tiny randomly initialised encoder of architecture ``kind`` saved with MiniLM's tokenizer; its default
    target modules."""
    import transformers

    from peft_recast.apps.encoder import load_tokenizer

    tokenizer = load_tokenizer()
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=tokenizer.vocab_size)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    configs = {
        "bert": (transformers.BertConfig(**size), ["query", "value"]),
        "roberta": (transformers.RobertaConfig(**size, **ids), ["query", "value"]),
        "deberta-v2": (transformers.DebertaV2Config(**size), ["query_proj", "value_proj"]),
        "modernbert": (transformers.ModernBertConfig(**size, **ids, cls_token_id=tokenizer.cls_token_id,
                                                     sep_token_id=tokenizer.sep_token_id), ["Wqkv"]),
        "mpnet": (transformers.MPNetConfig(**size, **ids), ["q", "v"]),
    }
    config, targets = configs[kind]
    torch.manual_seed(0)
    path = folder / kind
    transformers.AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), targets


@pytest.mark.requires_modules(MINILM_MODULE)  # its tokenizer
@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2", "modernbert", "mpnet"])
def test_train_on_other_encoders_with_their_default_targets(kind, own_files, capsys):
    from peft import PeftModel
    from transformers import AutoModel

    path, targets = _tiny_encoder(kind, own_files)
    run = own_files / "run"
    assert cli.main(["train", "--model", path, "--data", str(own_files / "train.csv"), "--text-column", "message",
                     "--label-column", "kind", "--epochs", "1", "--batch-size", "16", "--max-length", "16",
                     "--output-dir", str(run), "--threads", "1", "--no-head-first"]) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(targets) and config["base_model_name_or_path"] == path
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(run / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "recast_coefficients" in n) > 0
    assert cli.main(["evaluate", str(run), "--data", str(own_files / "test.jsonl"), "--threads", "1"]) == 0
    assert "on 24 examples" in capsys.readouterr().out
