"""What a saved RECAST adapter holds, read from its files alone (no base model needed): ``peft-recast inspect``."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# A group name carries its layer range where the layer index was: "encoder.layer.0-1.attention.self.query[...]".
_GROUP_RANGE = re.compile(r"(?<=\.)(\d+)(?:-(\d+))?(?=\.|\[|$)|^(\d+)(?:-(\d+))?(?=\.)")


def _group_matcher(name: str) -> tuple[str, int, int]:
    """``(role, first, last)`` of a group name; the role is written as :func:`~peft_recast.planning.role_and_index`
    writes it (``{}`` for the layer index, shape suffix dropped)."""
    base = name.split("[", 1)[0]
    match = _GROUP_RANGE.search(base)
    if match is None:
        return base, 0, 0
    first = int(match.group(1) or match.group(3))
    last = int(match.group(2) or match.group(4) or first)
    return base[: match.start()] + "{}" + base[match.end() :], first, last


def inspect_adapter(path: str) -> dict[str, Any]:
    """Summarise the RECAST adapter in ``path`` (an adapter directory, or a file inside one).

    Returns a JSON-serialisable dict: the config's main fields, the rows with coefficients of their own per module
    (``channels``), the weight file's size and tensors, and one entry per template group (the modules whose
    coefficients it stores, their numbers and the fingerprint, i.e. the singular values of the group's pretrained
    weights). A tensor shared by several modules (``fused_modules``, ``coefficient_sharing="position"``) is stored
    once, under the first of them, and counted there.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: {path} is not a saved PEFT adapter directory.")
    with open(config_path) as handle:
        config = json.load(handle)
    if config.get("peft_type") != "RECAST":
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter, not a RECAST one.")
    weight_path = next((os.path.join(directory, n) for n in WEIGHT_NAMES if os.path.exists(os.path.join(directory, n))),
                       None)
    if weight_path is None:
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no adapter weights ({' or '.join(WEIGHT_NAMES)}).")
    if weight_path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weight_path, framework="pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    else:
        import torch

        tensors = torch.load(weight_path, map_location="cpu", weights_only=True)  # never runs pickled code
        shapes = {key: list(value.shape) for key, value in tensors.items()}

    from .planning import role_and_index  # here, not with the module: it imports PEFT (seconds)

    fingerprint = config.get("base_fingerprint") or {}
    groups = {name: dict(name=name, modules=0, coefficients=0, singular_values=values)
              for name, values in fingerprint.items()}
    matchers = {name: _group_matcher(name) for name in groups}
    coefficients, gate_scores, others = 0, 0, {}
    for key, shape in sorted(shapes.items()):
        numel = math.prod(shape)
        if key.endswith(".recast_gate_scores"):
            gate_scores += numel
            continue
        if not key.endswith(".recast_coefficients"):
            others[key] = shape
            continue
        coefficients += numel
        role, index = role_and_index(key.removeprefix("base_model.model.").removesuffix(".recast_coefficients"))
        for name, (group_role, first, last) in matchers.items():
            if group_role == role and (index is None or first <= index <= last):
                groups[name]["modules"] += 1
                groups[name]["coefficients"] += numel
                break
    task_path = os.path.join(directory, "task.json")
    task = None
    if os.path.exists(task_path):
        with open(task_path) as handle:
            task = json.load(handle)
    return dict(
        path=directory,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        peft_version=config.get("peft_version"),
        settings={key: config.get(key) for key in (
            "target_modules", "layers_per_group", "num_groups", "num_templates", "num_coefficient_sets",
            "coefficient_blocks", "coefficient_scale", "coefficient_bound", "modules_to_save", "fused_modules",
            "coefficient_sharing", "module_gates", "inactive_modules",
        )},
        channels={key: len(rows) for key, rows in (config.get("channels") or {}).items()},
        weight_file=os.path.basename(weight_path),
        weight_bytes=os.path.getsize(weight_path),
        coefficients=coefficients,
        gate_scores=gate_scores,
        other_parameters=others,
        groups=list(groups.values()),
        task=task,
    )


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_adapter`'s result."""
    other = sum(math.prod(shape) for shape in info["other_parameters"].values())
    gates = f", {info['gate_scores']} gate scores" if info["gate_scores"] else ""
    lines = [
        f"RECAST adapter in {info['path']}",
        f"base model: {info['base_model']}   task type: {info['task_type']}   saved with PEFT {info['peft_version']}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in info["settings"].items() if v not in (None, False)),
        (
            f"{info['weight_file']}: {info['weight_bytes']:,} bytes; {info['coefficients']} RECAST coefficients in "
            f"{len(info['groups'])} groups{gates}, {other:,} other parameters"
        ),
    ]
    if info["channels"]:
        lines.append(f"rows with coefficients of their own: {sum(info['channels'].values())} in "
                     f"{len(info['channels'])} modules")
    for key, shape in info["other_parameters"].items():
        lines.append(f"  other: {key} {tuple(shape)}")
    lines.append(f"{'group':<56} {'modules':>7} {'coef':>5}  fingerprint (singular values of the pretrained weights)")
    for group in info["groups"]:
        values = ", ".join(f"{v:.4g}" for v in group["singular_values"])
        lines.append(f"{group['name']:<56} {group['modules']:>7} {group['coefficients']:>5}  [{values}]")
    if info["task"]:
        lines.append(f"task.json: {json.dumps(info['task'])}")
    return "\n".join(lines)
