"""Hub round trip, offline: push a RECAST adapter, then load it by repo id with ``PeftModel`` and ``AutoPeftModel*``.

Only the network is replaced: ``HfApi.create_repo`` / ``create_commit`` write each commit into a local Hugging Face
cache the way ``huggingface_hub`` lays out downloads (``models--user--repo/{blobs,snapshots/<commit>,refs/main}``,
snapshot files linked to content-addressed blobs). transformers' ``push_to_hub`` and PEFT's loading code run
unchanged, and with ``HF_HUB_OFFLINE=1`` they resolve ``"user/repo"`` from that cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants
from peft import AutoPeftModel, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from peft_recast import RecastConfig, hub

from ..models import tiny_bert, tiny_bert_classifier

BASE_ID, ADAPTER_ID = "someone/tiny-bert-classifier", "someone/tiny-bert-recast"

# Saving an adapter of a base model loaded by Hub id, PEFT asks the Hub whether the base has a config.json (to tell
# whether its vocabulary was resized); offline (as here, by design) it cannot, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file in someone/:UserWarning:peft.utils")


class LocalHubCache:
    """Stands in for the Hub's HTTP API: every commit becomes a snapshot of the local cache."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.commits: list[tuple[str, list[str]]] = []

    def repo_dir(self, repo_id: str) -> Path:
        return self.cache / ("models--" + repo_id.replace("/", "--"))

    def create_repo(self, api: HfApi, repo_id: str, **kwargs) -> RepoUrl:
        (self.repo_dir(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api: HfApi, repo_id: str, operations, *, commit_message: str, **kwargs) -> CommitInfo:
        repo = self.repo_dir(repo_id)
        ref = repo / "refs" / "main"
        parent = ref.read_text() if ref.exists() else None
        files = {}
        if parent is not None:  # a commit keeps the files it does not touch
            for path in (repo / "snapshots" / parent).rglob("*"):
                if path.is_symlink():
                    files[str(path.relative_to(repo / "snapshots" / parent))] = os.readlink(path).split("/")[-1]
        for operation in operations:
            with operation.as_file() as handle:
                content = handle.read()
            blob = hashlib.sha256(content).hexdigest()
            (repo / "blobs").mkdir(parents=True, exist_ok=True)
            (repo / "blobs" / blob).write_bytes(content)
            files[operation.path_in_repo] = blob
        commit = hashlib.sha1(repr((parent, sorted(files.items()))).encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        for name, blob in files.items():
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
        ref.write_text(commit)
        self.commits.append((repo_id, sorted(op.path_in_repo for op in operations)))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}", commit_message=commit_message,
                          commit_description="", oid=commit)


@pytest.fixture
def local_hub(tmp_path, monkeypatch) -> LocalHubCache:
    fake = LocalHubCache(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit",
                        lambda api, repo_id, operations, **kw: fake.create_commit(api, repo_id, operations, **kw))
    return fake


def _ids() -> torch.Tensor:
    return torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(0))


def _trained_classifier():
    """A RECAST classifier on the tiny base pushed as ``BASE_ID`` (loaded by id, as a user would)."""
    tiny_bert_classifier(num_labels=3).push_to_hub(BASE_ID)
    base = AutoModelForSequenceClassification.from_pretrained(BASE_ID)
    model = get_peft_model(base, RecastConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    return model


def test_push_to_hub_then_load_by_repo_id(local_hub):
    model = _trained_classifier()
    expected = model(input_ids=_ids()).logits
    hub.push_to_hub(model, ADAPTER_ID)
    assert local_hub.commits[-2:] == [(ADAPTER_ID, ["README.md"]),
                                      (ADAPTER_ID, ["README.md", "adapter_config.json", "adapter_model.safetensors"])]

    # the model card: RECAST, the base model, the coefficient count
    repo = local_hub.repo_dir(ADAPTER_ID)
    latest = repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert len(list((repo / "snapshots").iterdir())) == 2  # the card's commit, then the adapter's
    card = (latest / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {BASE_ID}" in card
    assert "- recast" in card and f"base_model:adapter:{BASE_ID}" in card
    assert "# RECAST adapter for someone/tiny-bert-classifier" in card
    # query+value, 4 layers, 2 per group: 2 templates x 2 blocks of rows each
    assert "**32 RECAST coefficients** in 4 template groups" in card
    tensors = load_file(latest / "adapter_model.safetensors")
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("recast_coefficients")) == 32

    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE_ID), ADAPTER_ID)
    assert isinstance(loaded.peft_config["default"], RecastConfig)
    torch.testing.assert_close(loaded.eval()(input_ids=_ids()).logits, expected)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(ADAPTER_ID).eval()
    torch.testing.assert_close(auto(input_ids=_ids()).logits, expected)


def test_plain_model_push_to_hub_loads_with_auto_peft_model(local_hub):
    """``PeftModel.push_to_hub`` alone (transformers' generic card) gives a repository AutoPeftModel loads."""
    tiny_bert().push_to_hub("someone/tiny-bert")
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained("someone/tiny-bert"), RecastConfig(init_weights=False)).eval()
    expected = model(input_ids=_ids()).last_hidden_state
    model.push_to_hub("someone/tiny-bert-recast-plain")
    auto = AutoPeftModel.from_pretrained("someone/tiny-bert-recast-plain").eval()
    assert type(auto.base_model).__name__ == "RecastModel"
    torch.testing.assert_close(auto(input_ids=_ids()).last_hidden_state, expected)


def test_model_card_refuses_other_methods():
    from peft import LoraConfig

    model = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"]))
    with pytest.raises(TypeError, match="not a RecastConfig"):
        hub.recast_model_card(model)


def test_later_plain_push_keeps_the_recast_card(local_hub):
    """After ``hub.push_to_hub`` put a RECAST card on the repository, an update pushed with plain
    ``model.push_to_hub`` (more training, same repo) keeps that card and replaces the coefficients."""
    model = _trained_classifier()
    hub.push_to_hub(model, ADAPTER_ID)
    with torch.no_grad():
        model.base_model.model.bert.encoder.layer[0].attention.self.query.recast_coefficients["default"].add_(0.25)
    expected = model(input_ids=_ids()).logits
    model.push_to_hub(ADAPTER_ID)

    repo = local_hub.repo_dir(ADAPTER_ID)
    latest = repo / "snapshots" / (repo / "refs" / "main").read_text()
    card = (latest / "README.md").read_text()
    assert "# RECAST adapter for someone/tiny-bert-classifier" in card and "**32 RECAST coefficients**" in card
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE_ID), ADAPTER_ID)
    torch.testing.assert_close(loaded.eval()(input_ids=_ids()).logits, expected)


def test_plain_first_push_gets_the_generic_card_for_lora_too(local_hub):
    """Why ``hub.push_to_hub`` exists: on a new repository, plain ``PeftModel.push_to_hub`` writes transformers'
    generic card (``library_name: transformers``) for every PEFT method, LoRA included, not the card PEFT's
    ``save_pretrained`` writes. If this starts failing, upstream changed and the Hub section of
    docs/integrations.md must follow."""
    from peft import LoraConfig

    tiny_bert().push_to_hub("someone/tiny-bert")
    from transformers import AutoModel

    for name, config in (("lora", LoraConfig(target_modules=["query"])), ("recast", RecastConfig())):
        model = get_peft_model(AutoModel.from_pretrained("someone/tiny-bert"), config)
        model.push_to_hub(f"someone/tiny-bert-{name}")
        repo = local_hub.repo_dir(f"someone/tiny-bert-{name}")
        card = (repo / "snapshots" / (repo / "refs" / "main").read_text() / "README.md").read_text()
        assert "library_name: transformers" in card and "RECAST" not in card


def test_model_card_saved_to_a_folder(tmp_path):
    """``recast_model_card(model).save(...)`` for a folder uploaded by hand: valid card metadata, same text."""
    from huggingface_hub import ModelCard

    model = get_peft_model(tiny_bert(), RecastConfig())
    hub.recast_model_card(model).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "recast" in card.data.tags
    assert "**32 RECAST coefficients** in 4 template groups" in card.text
