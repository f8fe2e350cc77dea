"""``transformers.Trainer`` with a RECAST model: checkpoints, ``resume_from_checkpoint``, ``load_best_model_at_end``.
(The Trainer example script, which runs ``peft_recast.apps.trainer``, is tested in ``tests/apps/test_examples.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_recast import RecastConfig

from ..models import tiny_bert_classifier

datasets = pytest.importorskip("datasets")

STEPS_PER_EPOCH = 12  # 96 examples, batch 8
SAVE_EVERY = 4


def _model():
    """A tiny BERT classifier with the default RECAST adapter; the classifier head trains too (SEQ_CLS)."""
    return get_peft_model(tiny_bert_classifier(), RecastConfig(task_type="SEQ_CLS"))


def _dataset(n: int, seed: int):
    """Label 1 when most tokens are below 50: learnable, so the coefficients get real gradients."""
    ids = torch.randint(1, 100, (n, 8), generator=torch.Generator().manual_seed(seed))
    labels = ((ids < 50).sum(1) > 4).long()
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * n, "labels": labels.tolist()}
    )


def _trainer(model, output_dir: Path, callbacks=(), **kwargs) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-2,
        save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=100, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=_dataset(8 * STEPS_PER_EPOCH, seed=0),
                   eval_dataset=_dataset(32, seed=1), callbacks=list(callbacks))


def _adapter_state(model) -> dict[str, torch.Tensor]:
    """Coefficients and head weights, keyed as in the adapter file."""
    from peft import get_peft_model_state_dict

    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}


class _StopAt(TrainerCallback):
    """Interrupts training after step ``step`` (its checkpoint is written first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_checkpoints_hold_the_adapter_only_and_reload(tmp_path):
    model = _model()
    before = _adapter_state(model)
    _trainer(model, tmp_path).train()
    checkpoints = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS_PER_EPOCH + 1, 4)]
    for checkpoint in checkpoints:
        assert not (checkpoint / "model.safetensors").exists()
        assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "RECAST"
        assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()
        keys = set(load_file(checkpoint / "adapter_model.safetensors"))
        assert keys and all(k.endswith(".recast_coefficients") or ".classifier." in k for k in keys)
        assert sum(k.endswith(".recast_coefficients") for k in keys) == 8  # query + value in 4 layers
    after = _adapter_state(model)
    moved = [k for k in after if k.endswith("recast_coefficients") and not torch.equal(after[k], before[k])]
    assert len(moved) == 8
    first, last = (load_file(c / "adapter_model.safetensors") for c in (checkpoints[0], checkpoints[-1]))
    assert not torch.equal(next(iter(first.values())), next(iter(last.values())))

    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(), checkpoints[-1]).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = _model()
    _trainer(uninterrupted, tmp_path / "a").train()

    interrupted = _model()
    _trainer(interrupted, tmp_path / "b", callbacks=[_StopAt(SAVE_EVERY)]).train()
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == [f"checkpoint-{SAVE_EVERY}"]

    resumed = _model()  # a fresh process would start from here
    trainer = _trainer(resumed, tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / f"checkpoint-{SAVE_EVERY}"))
    assert trainer.state.global_step == STEPS_PER_EPOCH

    expected, got = _adapter_state(uninterrupted), _adapter_state(resumed)
    assert expected.keys() == got.keys()
    halfway = load_file(tmp_path / "b" / f"checkpoint-{SAVE_EVERY}" / "adapter_model.safetensors")
    key = next(k for k in expected if k.endswith("recast_coefficients"))
    assert not torch.allclose(halfway[key], expected[key])  # it did train after resuming
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    evaluations = []

    def first_is_best(prediction) -> dict[str, float]:
        # a metric that makes the first evaluation (step 4) the best, so the best is not the last checkpoint
        evaluations.append(len(evaluations))
        return {"score": 1.0 if len(evaluations) == 1 else 0.0}

    model = _model()
    trainer = _trainer(model, tmp_path, eval_strategy="steps", eval_steps=SAVE_EVERY, load_best_model_at_end=True,
                       metric_for_best_model="score", greater_is_better=True)
    trainer.compute_metrics = first_is_best
    trainer.train()
    assert len(evaluations) == STEPS_PER_EPOCH // SAVE_EVERY
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{SAVE_EVERY}"
    best = load_file(tmp_path / f"checkpoint-{SAVE_EVERY}" / "adapter_model.safetensors")
    last = load_file(tmp_path / f"checkpoint-{STEPS_PER_EPOCH}" / "adapter_model.safetensors")
    state = _adapter_state(model)
    assert state.keys() == best.keys()
    for key in best:
        torch.testing.assert_close(state[key], best[key])
    assert any(not torch.equal(state[key], last[key]) for key in best)
