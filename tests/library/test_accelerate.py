"""Data-parallel training with ``accelerate launch``: 2 CPU processes (gloo) give the coefficients of 1 process.

Run as a script, this file is the training worker::

    accelerate launch --multi_gpu --num_processes 2 tests/test_accelerate.py OUT_DIR PER_PROCESS_BATCH

(``--multi_gpu`` picks accelerate's ``torch.distributed`` launcher; on a machine without GPUs the processes use the
CPU and the gloo backend.) With 2 processes of batch 4, every step averages the gradients of the same 8 examples a
single process sees with batch 8, so the trained coefficients must agree to float rounding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_recast  # noqa: F401  (registers RECAST with PEFT)

REPO = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8
STEPS = 6


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 100, (GLOBAL_BATCH * STEPS, 8), generator=torch.Generator().manual_seed(0))
    return ids, ((ids < 50).sum(1) > 4).long()


def _train(output_dir: str, per_process_batch: int) -> None:
    """The worker: train RECAST + head on a tiny BERT with a plain accelerate loop, save the adapter (main process)."""
    from accelerate import Accelerator
    from peft import get_peft_model

    from peft_recast import RecastConfig
    from tests.models import tiny_bert_classifier

    accelerator = Accelerator(cpu=True)
    # no dropout: each process would draw its own masks
    model = get_peft_model(tiny_bert_classifier(dropout=0.0), RecastConfig(task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids, labels), batch_size=per_process_batch, shuffle=False
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    steps = 0
    for batch_ids, batch_labels in loader:
        loss = model(input_ids=batch_ids, labels=batch_labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, state_dict=accelerator.get_state_dict(model)
    )
    print(f"process {accelerator.process_index}/{accelerator.num_processes} ({accelerator.distributed_type}): "
          f"{steps} steps", flush=True)


def _run(command: list[str], output_dir: Path) -> str:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(command + [__file__, str(output_dir)], check=False, cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="needs accelerate's command line")
def test_two_processes_train_the_same_coefficients_as_one(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from ..models import tiny_bert_classifier

    launcher = str(Path(sys.executable).parent / "accelerate")
    two = _run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"], tmp_path / "two")
    assert f"process 0/2 (DistributedType.MULTI_CPU): {STEPS} steps" in two
    assert f"process 1/2 (DistributedType.MULTI_CPU): {STEPS} steps" in two
    one = _run([sys.executable], tmp_path / "one")
    assert f"process 0/1 (DistributedType.NO): {STEPS} steps" in one

    expected = load_file(tmp_path / "one" / "adapter_model.safetensors")
    got = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and sum(k.endswith("recast_coefficients") for k in got) == 8
    assert all(expected[k].abs().max() > 1e-3 for k in expected if k.endswith("recast_coefficients"))  # trained
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    # the adapter written by the 2-process run loads like any other
    PeftModel.from_pretrained(tiny_bert_classifier(dropout=0.0), tmp_path / "two")


if __name__ == "__main__":
    _train(sys.argv[1], per_process_batch=GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")))
