"""Batches that mix tasks: each sample gets its own adapter through `adapter_names`."""

import pytest
import torch
from peft import get_peft_model

from peft_recast import RecastConfig

from ..models import MODEL_BUILDERS, model_output, tiny_bert_classifier


@pytest.fixture
def two_task_model(model_kind, recast_config):
    model = get_peft_model(MODEL_BUILDERS[model_kind](), recast_config(init_weights=False))
    model.add_adapter("other", recast_config(init_weights=False, num_coefficient_sets=2))
    return model.eval()


def test_mixed_batch_equals_each_adapter_alone(two_task_model, input_ids):
    model = two_task_model
    names = ["default", "other", "__base__", "other"]
    mixed = model_output(model, input_ids, adapter_names=names)
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        alone = model_output(model, input_ids)
        rows = [i for i, name in enumerate(names) if name == adapter]
        torch.testing.assert_close(mixed[rows], alone[rows])
    with model.disable_adapter():
        base = model_output(model, input_ids)
    torch.testing.assert_close(mixed[2], base[2])


def test_mixed_batch_misuse_is_refused(two_task_model, input_ids):
    model = two_task_model
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): typo"):
        model(input_ids=input_ids, adapter_names=["default", "typo", "default", "default"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids=input_ids, adapter_names=["default"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode."):
        model(input_ids=input_ids, adapter_names=["default"] * 4)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(input_ids=input_ids, adapter_names=["default"] * 4)


def test_generate_with_mixed_adapters():
    model = get_peft_model(MODEL_BUILDERS["llama"](), RecastConfig(init_weights=False))
    model.add_adapter("other", RecastConfig(init_weights=False))
    model.eval()
    prompt = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    mixed = model.generate(input_ids=prompt, adapter_names=["default", "other"], max_new_tokens=4, do_sample=False)
    for row, adapter in enumerate(["default", "other"]):
        model.set_adapter(adapter)
        alone = model.generate(input_ids=prompt[row : row + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(mixed[row], alone[0])


def test_mixed_batch_routes_each_task_head():
    base = tiny_bert_classifier(seed=0, num_labels=3, layers=2)
    model = get_peft_model(base, RecastConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("other", RecastConfig(task_type="SEQ_CLS", init_weights=False))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["other"].weight.add_(1.0)
    model.eval()
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mixed = model(input_ids=ids, adapter_names=["default", "other"]).logits
    for row, adapter in enumerate(["default", "other"]):
        model.set_adapter(adapter)
        torch.testing.assert_close(mixed[row], model(input_ids=ids).logits[row])


def test_beam_search_with_mixed_adapters():
    model = get_peft_model(MODEL_BUILDERS["llama"](), RecastConfig(init_weights=False))
    model.add_adapter("other", RecastConfig(init_weights=False))
    model.eval()
    prompt = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    mixed = model.generate(input_ids=prompt, adapter_names=["default", "other"], max_new_tokens=3, num_beams=2,
                           do_sample=False)
    for row, adapter in enumerate(["default", "other"]):
        model.set_adapter(adapter)
        alone = model.generate(input_ids=prompt[row : row + 1], max_new_tokens=3, num_beams=2, do_sample=False)
        assert torch.equal(mixed[row], alone[0])
