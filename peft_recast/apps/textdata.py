"""A user's own labelled texts: read from a file, checked, and cut into training and validation examples.

``peft-recast train --data``, ``evaluate --data`` and ``predict --data`` read one table of texts (and labels) from

=====================  ===========================================================================
``.csv`` / ``.tsv``    a header line, then one example per line
``.jsonl``             one JSON object per line (``.json``: a JSON array of objects, or JSON lines)
``.parquet``           a Parquet table
a folder               a dataset saved with ``datasets``' ``save_to_disk`` (its ``train`` split, or the only one)
``-``                  standard input: JSON lines when every line is an object, otherwise one text per line
=====================  ===========================================================================

Everything wrong with the input raises :class:`UsageError` with one line that says what and how to fix it; the
command line prints it and exits with status 2 before anything is written.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    import pandas

# Share of the training examples held back for validation when no validation data is given, and its bounds.
VALIDATION_FRACTION = 0.1
MIN_VALIDATION = 8
MAX_VALIDATION = 1000
STDIN = "-"
STDIN_TEXT_COLUMN = "text"


class UsageError(ValueError):
    """Bad input to a command (data, columns, labels, model choice): one line for the user, exit status 2."""


@dataclass
class TextExamples:
    """Examples as the applications feed them: ``texts``, optional second texts ``pairs`` (sentence pairs) and
    ``labels`` as class names (``None`` when the data has no labels, as for ``predict``)."""

    texts: list[str]
    pairs: Optional[list[str]] = None
    labels: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextExamples:
        pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
        return TextExamples([self.texts[i] for i in indices], pick(self.pairs), pick(self.labels))


def _read_stdin(stream: io.TextIOBase) -> pandas.DataFrame:
    import pandas

    lines = [line.rstrip("\n") for line in stream if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        try:
            return pandas.DataFrame([json.loads(line) for line in lines])
        except json.JSONDecodeError as error:
            raise UsageError(f"standard input looks like JSON lines but is not ({error}).") from error
    return pandas.DataFrame({STDIN_TEXT_COLUMN: lines})


def read_table(path: str, stdin: Optional[io.TextIOBase] = None) -> pandas.DataFrame:
    """The table in ``path`` (see the module's formats); ``"-"`` reads ``stdin`` (default: the process's)."""
    import pandas

    if path == STDIN:
        frame = _read_stdin(stdin or sys.stdin)
    elif not os.path.exists(path):
        raise UsageError(f"{path}: no such file or folder.")
    elif os.path.isdir(path):
        frame = _read_saved_dataset(path)
    else:
        extension = os.path.splitext(path)[1].lower()
        readers = {
            ".csv": ("CSV", lambda: pandas.read_csv(path)),
            ".tsv": ("TSV", lambda: pandas.read_csv(path, sep="\t")),
            ".jsonl": ("JSON lines", lambda: pandas.read_json(path, lines=True)),
            ".json": ("JSON", lambda: _read_json(path)),
            ".parquet": ("Parquet", lambda: pandas.read_parquet(path)),
        }
        if extension not in readers:
            raise UsageError(f"{path}: unknown file type {extension or '(no extension)'!r}; give a .csv, .tsv, .jsonl, "
                             ".json or .parquet file, or a folder saved with datasets' save_to_disk.")
        kind, read = readers[extension]
        try:
            frame = read()
        except Exception as error:  # each reader has its own exception types; all mean "not this format"
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"{path} is not a readable {kind} file ({reason}); check the file or its extension.")
    if len(frame) == 0:
        raise UsageError(f"{'standard input' if path == STDIN else path} holds no examples.")
    return frame


def _read_json(path: str) -> pandas.DataFrame:
    import pandas

    with open(path, encoding="utf-8") as handle:
        start = handle.read(1024).lstrip()[:1]
    return pandas.read_json(path, lines=start != "[")


def _read_saved_dataset(path: str) -> pandas.DataFrame:
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises FileNotFoundError or its own errors for a folder it cannot read
        raise UsageError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk ({error}).")
    if isinstance(saved, datasets.DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise UsageError(f"{path} holds the splits {', '.join(saved)} and no 'train' split; save the one to use.")
    return saved.to_pandas()


def _column(frame: pandas.DataFrame, name: str, source: str, option: str) -> list:
    if name not in frame.columns:
        existing = ", ".join(repr(str(column)) for column in frame.columns)
        raise UsageError(f"{source} has no column {name!r} (its columns: {existing}); name the right one with {option}.")
    return frame[name].tolist()


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _texts(values: list, name: str, source: str) -> list[str]:
    empty = [row for row, value in enumerate(values) if _is_missing(value) or not str(value).strip()]
    if empty:
        shown = ", ".join(str(row + 1) for row in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise UsageError(f"{source}: {len(empty)} example(s) have an empty {name!r} (rows {shown}, counting from 1); "
                         "remove them or fill them in.")
    return [str(value) for value in values]


def label_name(value) -> str:
    """A label as a class name: integers (also when stored as floats, ``1.0``) print without a decimal point."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def examples_from_table(
    frame: pandas.DataFrame,
    source: str,
    text_column: str,
    text_pair_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> TextExamples:
    """:class:`TextExamples` from the named columns of ``frame`` (``source`` names the data in errors)."""
    texts = _texts(_column(frame, text_column, source, "--text-column"), text_column, source)
    pairs = None
    if text_pair_column is not None:
        pairs = _texts(_column(frame, text_pair_column, source, "--text-pair-column"), text_pair_column, source)
    labels = None
    if label_column is not None:
        values = _column(frame, label_column, source, "--label-column")
        missing = [row for row, value in enumerate(values) if _is_missing(value) or str(value).strip() == ""]
        if missing:
            raise UsageError(f"{source}: {len(missing)} example(s) have no {label_column!r} (first: row {missing[0] + 1}"
                             ", counting from 1); remove them or label them.")
        labels = [label_name(value) for value in values]
    return TextExamples(texts, pairs, labels)


def read_examples(
    path: str, text_column: str, text_pair_column: Optional[str] = None, label_column: Optional[str] = None
) -> TextExamples:
    """:func:`read_table` then :func:`examples_from_table`."""
    source = "standard input" if path == STDIN else path
    return examples_from_table(read_table(path), source, text_column, text_pair_column, label_column)


def class_names(labels: Sequence[str], source: str) -> list[str]:
    """The distinct labels in a stable order (numerically when every label is an integer); at least two."""
    names = sorted(set(labels), key=lambda name: (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name))
    if len(names) < 2:
        raise UsageError(f"{source}: every example has the label {names[0]!r}; a classifier needs at least two classes.")
    return names


def check_known_labels(labels: Sequence[str], classes: Sequence[str], source: str) -> None:
    """Refuse labels the trained run never saw (it cannot predict them)."""
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise UsageError(f"{source} has label(s) {', '.join(map(repr, unknown[:5]))} that the run was not trained on "
                         f"(its classes: {', '.join(map(repr, classes))}).")


def split_validation(examples: TextExamples, seed: int) -> tuple[TextExamples, TextExamples]:
    """Hold back ``VALIDATION_FRACTION`` of ``examples`` (at least ``MIN_VALIDATION``, at most ``MAX_VALIDATION``),
    drawn with ``seed``: ``(train, validation)``."""
    count = min(MAX_VALIDATION, max(MIN_VALIDATION, round(VALIDATION_FRACTION * len(examples))))
    if len(examples) < 2 * count:
        raise UsageError(f"{len(examples)} examples are too few to cut a validation split of {count} from them; give "
                         f"at least {2 * count} examples, or validation data with --validation-data.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return examples.subset(sorted(order[count:])), examples.subset(sorted(order[:count]))
