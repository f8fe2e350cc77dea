"""Share RECAST adapters on the 🤗 Hub with a model card that says what they are.

``model.push_to_hub(repo_id)`` (transformers' ``PushToHubMixin`` on ``PeftModel``) uploads the adapter files and
``adapter_config.json``, but writes transformers' generic model card (transformers 5 replaces the card PEFT's
``save_pretrained`` writes) unless the repository already has one, in which case it keeps it. :func:`push_to_hub`
uses that: it commits a RECAST model card first (method, base model, coefficient count, groups, how to load), then
calls ``model.push_to_hub``. Loading needs nothing RECAST-specific besides ``import peft_recast``::

    import peft_recast
    from peft import AutoPeftModel, PeftModel
    model = PeftModel.from_pretrained(base_model, "user/repo")      # or AutoPeftModel.from_pretrained("user/repo")
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from .config import RecastConfig
from .summary import recast_summary

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard


def recast_model_card(model: nn.Module, adapter_name: str = "default") -> ModelCard:
    """A ``huggingface_hub.ModelCard`` for the RECAST adapter ``adapter_name`` of a ``PeftModel``.

    Its metadata follow PEFT's cards (``library_name: peft``, ``base_model``, the ``base_model:adapter:`` tag) plus
    a ``recast`` tag; its text names the method, the base model, the coefficient count and the template groups.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = model.peft_config[adapter_name]
    if not isinstance(config, RecastConfig):
        raise TypeError(f"Adapter '{adapter_name}' is a {type(config).__name__}, not a RecastConfig.")
    summary = recast_summary(model, adapter_name)
    base = config.base_model_name_or_path
    # a Hub id ("org/name") goes into the metadata and gets a link; a local path is only named
    on_hub = bool(base) and not os.path.isabs(base) and not os.path.isdir(base) and base.count("/") <= 1
    tags = ["peft", "recast"] + ([f"base_model:adapter:{base}"] if on_hub else [])
    data = ModelCardData(library_name="peft", base_model=base if on_hub else None, tags=tags)
    base_text = f"[`{base}`](https://huggingface.co/{base})" if on_hub else f"`{base}`" if base else "its base model"
    rows = "\n".join(
        f"| `{group.name}` | {group.modules} | {'x'.join(map(str, group.shape))} | {group.templates} | "
        f"{group.coefficients} |"
        for group in summary.groups
    )
    task = f", task type `{config.task_type}`" if config.task_type else ""
    targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
    text = f"""
# RECAST adapter for {base or "a base model"}

A [RECAST](https://arxiv.org/abs/2411.16870) adapter (Tasnim & Plummer, ICLR 2025) for {base_text}{task}, made with
[peft_recast](https://pypi.org/project/peft-recast/). Each adapted weight is its pretrained value plus a combination
of a few templates shared by neighbouring layers; the templates are rebuilt from the base model's weights when the
adapter is loaded, so this repository stores only the trained coefficients:
**{summary.coefficients} RECAST coefficients** in {len(summary.groups)} template groups ({summary.coefficient_bytes:,}
bytes), plus {summary.other_trainable:,} other saved parameters (heads, biases).

The adapter checks the singular values of the base model's weights when it is loaded and refuses any other model.

## Use

```python
import peft_recast  # registers RECAST with PEFT
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "<this repository>")  # base_model: {base or "the base model"}
```

## Template groups

| group | modules | weight shape | templates | coefficients |
|---|---|---|---|---|
{rows}

RECAST settings: `target_modules={targets!r}`, `num_templates={config.num_templates}`,
`num_coefficient_sets={config.num_coefficient_sets}`, `coefficient_blocks={config.coefficient_blocks}`,
`coefficient_scale={config.coefficient_scale:g}`.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + text)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    adapter_name: str = "default",
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    **push_kwargs: Any,
) -> CommitInfo:
    """``model.push_to_hub(repo_id)`` with :func:`recast_model_card` as the repository's ``README.md``.

    Returns what ``model.push_to_hub`` returns (the ``CommitInfo`` of the upload of the adapter files).
    """
    from huggingface_hub import HfApi

    card = recast_model_card(model, adapter_name)
    api = HfApi()
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    api.upload_file(
        path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id, token=token,
        commit_message="RECAST model card",
    )
    return model.push_to_hub(repo_id, token=token, private=private, commit_message=commit_message, **push_kwargs)
