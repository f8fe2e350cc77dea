"""The benchmark's methods, read from the experiment files shipped beside this module, and the task lists.

``experiments/<family>/<name>.json`` describes one method: its ``label``, its ``kind`` (``"probe"``, ``"peft"`` or
``"full"``), its PEFT config (``peft_config``: the config class's name and its keyword arguments; ``null`` for the probe
and full fine-tuning), its learning-rate grid ``lrs`` and ``default_lr``, and its recipe flags (``head_first``,
``align_epochs``, ``channels``; see :class:`Method`). ``experiments/families.json`` lists the families in order, a
line on each, and each family's methods in order. :func:`load_methods` reads them all into :data:`METHODS`.

To add a method, add its file and its name to its family in ``families.json``; its runs get keys of their own (the key
digests the full config and the recipe flags), so earlier results stay valid.
"""

from __future__ import annotations

import copy
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

EXPERIMENTS = "experiments"
FAMILIES_FILE = "families.json"
KINDS = ("probe", "peft", "full")


def _no_config() -> None:
    return None


@dataclass(frozen=True)
class Method:
    """A way to adapt the encoder: ``config()`` builds a fresh PEFT config (``None``: head only or full fine-tuning).

    ``lrs`` is the peak AdamW learning-rate grid of the adapter's parameters (swept on validation); ``default_lr``
    is used where no sweep runs (``--quick``). ``align_epochs``: a LayerNorm alignment stage (the two-stage PETL
    recipe, scale and shift first): for this many epochs only the adapter's LayerNorm copies (``modules_to_save``)
    and the head train, then every adapter parameter does. ``head_first``: the head is first trained alone on the
    frozen encoder (exactly the linear probe's run), then head and adapter train together from there (LP-FT).
    ``channels``: after the head's run, this many output channels get coefficients of their own, the channels
    :func:`~peft_recast.rank_channels` ranks highest on the task's first training batches (needs ``head_first``);
    with ``align_epochs`` the LayerNorm stage runs first (a run of its own), the channels are ranked on the aligned
    model, and the remaining epochs train everything. ``family``: the folder of its experiment file.
    """

    name: str
    label: str
    kind: str
    lrs: tuple[float, ...]
    default_lr: float
    config: Callable[[], object] = _no_config
    align_epochs: int = 0
    head_first: bool = False
    channels: int = 0
    family: str = ""


@dataclass(frozen=True)
class Family:
    """Methods that share an idea: ``about`` is the line ``peft-recast bench --help`` prints for them."""

    name: str
    about: str
    methods: tuple[str, ...]


def config_builder(peft_config: Optional[dict[str, Any]]) -> Callable[[], object]:
    """A function returning a fresh config from an experiment file's ``peft_config``: ``RecastConfig`` from this
    package, any other class by its name in ``peft`` (e.g. ``"LoraConfig"``); ``None`` builds nothing."""
    if peft_config is None:
        return _no_config
    class_name, kwargs = peft_config["class"], peft_config.get("kwargs", {})

    def build() -> object:
        if class_name == "RecastConfig":
            from ... import RecastConfig

            config_class = RecastConfig
        else:
            import peft

            config_class = getattr(peft, class_name)
        return config_class(**copy.deepcopy(kwargs))

    return build


_REQUIRED = {"name", "label", "kind", "peft_config", "lrs", "default_lr"}
_FLAGS = {"head_first": bool, "align_epochs": int, "channels": int}


def read_method(data: dict[str, Any], family: str, source: str) -> Method:
    """One experiment file's contents (``source``: its path, for errors) as a :class:`Method`."""
    keys = set(data)
    if not _REQUIRED <= keys or not keys <= _REQUIRED | set(_FLAGS):
        raise ValueError(f"{source}: an experiment holds {sorted(_REQUIRED)} and optionally {sorted(_FLAGS)}; it has "
                         f"{sorted(keys)}.")
    if data["kind"] not in KINDS:
        raise ValueError(f"{source}: kind {data['kind']!r} is not one of {', '.join(KINDS)}.")
    if (data["peft_config"] is None) != (data["kind"] != "peft"):
        raise ValueError(f"{source}: a 'peft' method has a peft_config, the probe and full fine-tuning have none.")
    lrs = tuple(float(lr) for lr in data["lrs"])
    default_lr = float(data["default_lr"])
    if data["kind"] != "probe" and default_lr not in lrs:
        raise ValueError(f"{source}: default_lr {default_lr:g} is not in its grid {list(lrs)}.")
    flags = {name: data.get(name, kind()) for name, kind in _FLAGS.items()}
    wrong = [name for name, kind in _FLAGS.items() if type(flags[name]) is not kind]
    if wrong:
        raise ValueError(f"{source}: {', '.join(wrong)} must be {', '.join(_FLAGS[n].__name__ for n in wrong)}.")
    return Method(name=data["name"], label=data["label"], kind=data["kind"], lrs=lrs, default_lr=default_lr,
                  config=config_builder(data["peft_config"]), family=family, **flags)


def load_methods(root=None) -> tuple[dict[str, Method], dict[str, Family]]:
    """Every method of ``root`` (default: the ``experiments`` folder shipped with this module), in the order of
    ``families.json``, and the families. Refuses a file that ``families.json`` does not list, a listed method without
    its file, a name given twice, and a file whose ``name`` is not its file name."""
    # beside this file, found without importing the package: the command line reads this module for its help alone
    root = root if root is not None else Path(__file__).resolve().parent / EXPERIMENTS
    methods: dict[str, Method] = {}
    families: dict[str, Family] = {}
    for entry in json.loads(root.joinpath(FAMILIES_FILE).read_text()):
        family = Family(entry["family"], entry["about"], tuple(entry["methods"]))
        folder = root.joinpath(family.name)
        files = {path.name for path in folder.iterdir() if path.name.endswith(".json")} if folder.is_dir() else set()
        unlisted = sorted(files - {f"{name}.json" for name in family.methods})
        if unlisted:
            raise ValueError(f"{folder}: {', '.join(unlisted)} not listed under {family.name!r} in {FAMILIES_FILE}.")
        for name in family.methods:
            source = folder.joinpath(f"{name}.json")
            if f"{name}.json" not in files:
                raise ValueError(f"{FAMILIES_FILE} lists {name!r} under {family.name!r}, but {source} does not exist.")
            method = read_method(json.loads(source.read_text()), family.name, str(source))
            if method.name != name or name in methods:
                raise ValueError(f"{source}: its name {method.name!r} must be its file name and appear once.")
            methods[name] = method
        families[family.name] = family
    return methods, families


METHODS, FAMILIES = load_methods()


def method_families_help(width: int = 100) -> str:
    """Plain text for ``peft-recast bench --help``: every family with its line, then its method names (whole names,
    never split at a hyphen)."""
    lines = []
    for family in FAMILIES.values():
        lines.append(f"{family.name}: {family.about}")
        lines += textwrap.wrap(" ".join(family.methods), width, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)


def method_names_help(width: int = 100) -> str:
    """Plain text for ``peft-recast bench --help``, before :func:`method_families_help`: how many methods there are,
    which run by default, and how their names are made."""
    text = (f"METHOD names: {len(METHODS)} methods in {len(FAMILIES)} families, below (default: all of them; --quick: "
            f"{' '.join(QUICK_METHODS)}). A number in a name is the count of numbers the adapter trains per task (the "
            "head not counted); -hf: the head trains alone first, then head and adapter together. The table names "
            "each method in words.")
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False))


QUICK_METHODS = ("probe", "recast", "fourierft-48", "lora-r8")
# Trainable numbers of the RECAST rungs on MiniLM-L6; FourierFT gets the same count (n_frequency per q/v module).
LADDER_SIZES = (24, 48, 72, 144, 216, 288, 432, 648, 864)
LADDER_METHODS = ("probe", *[f"recast-{size}" if size != 48 else "recast" for size in LADDER_SIZES],
                  *[f"fourierft-{size}" for size in LADDER_SIZES], "lora-r8")
ALL_TASKS = ("trec6", "sms", "bbc", "tweets", "amazon", "election", "newsgroups", "clothing", "healthnews")
# The small-data protocol (`bench --small-data`): where a user starts, and what the CPU runs in full (~96 steps a run).
SMALL_DATA_TRAIN, SMALL_DATA_EPOCHS = 1000, 3
QUICK_TASKS = ("trec6", "sms")
# The reference every cost ratio is taken against.
REFERENCE_METHOD = "lora-r8"
# Every tiny-budget peer of RECAST at every count it runs at: FourierFT, TinyLoRA tied and untied, UniLoRA, WaveFT.
PEER_METHODS = FAMILIES["peers"].methods
# Rate grids that benchmarks/decoder_task.py reuses.
WIDE_RECAST_LRS, WIDE_LORA_LRS = METHODS["recast"].lrs, METHODS["lora-r8"].lrs
TIED_TINYLORA_LRS, UNILORA_LRS = METHODS["tinylora-tied-48"].lrs, METHODS["unilora-48"].lrs
