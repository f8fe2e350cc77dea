"""``RecastConfig(trainable_token_indices=...)``: PEFT's trainable tokens beside the coefficients (new tokens of a chat
template), trained, counted, saved and reloaded with the adapter."""

import copy

import torch
from peft import PeftModel, get_peft_model

from peft_recast import RecastConfig

from ..models import tiny_llama


def test_trainable_token_rows_train_count_save_and_reload(tmp_path):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), RecastConfig(trainable_token_indices=[3, 5]))
    plain = get_peft_model(copy.deepcopy(base), RecastConfig())
    hidden = base.config.hidden_size
    assert model.get_nb_trainable_parameters()[0] == plain.get_nb_trainable_parameters()[0] + 2 * hidden
    ids = torch.tensor([[1, 3, 5, 7, 3]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tokens = torch.tensor([3, 5, 7])
    with torch.no_grad():
        trained = model.get_input_embeddings()(tokens).clone()
        original = base.get_input_embeddings()(tokens)
    assert not torch.equal(trained[0], original[0]) and not torch.equal(trained[1], original[1])
    assert torch.equal(trained[2], original[2])  # a token not listed keeps its row
    model.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert reloaded.peft_config["default"].trainable_token_indices == [3, 5]
    with torch.no_grad():
        assert torch.equal(reloaded.get_input_embeddings()(tokens), trained)
        model.eval(), reloaded.eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
