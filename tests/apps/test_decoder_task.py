"""`benchmarks/decoder_task.py`: a task posed as generation on a decoder LM pretrained here."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..helpers import REPO, TASK_DATA_MODULES, import_benchmark

TEXTS = ["what is the capital of france ?", "who wrote hamlet ?", "how many legs does a spider have ?",
         "call me later , the number is new"] * 20


@pytest.fixture(scope="module")
def decoder_task():
    return import_benchmark("decoder_task")


@pytest.fixture(scope="module")
def tokenizer(decoder_task, tmp_path_factory):
    return decoder_task.build_tokenizer(TEXTS, 600, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_left_padded_prompts_give_each_texts_own_next_token_logits(decoder_task, tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    prompts = decoder_task.Prompts(tokenizer, TEXTS[:4], max_length=5)
    assert [len(ids) for ids in prompts.ids] == prompts.lengths
    assert all(ids[-len(tokenizer(decoder_task.PROMPT)["input_ids"]):] == tokenizer(decoder_task.PROMPT)["input_ids"]
               for ids in prompts.ids)  # the text cut to 5 tokens, then the prompt
    with torch.no_grad():
        batched = prompts.logits(model, [0, 1, 2, 3])
        for i in range(4):
            alone = model(input_ids=torch.tensor([prompts.ids[i]])).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


def test_answers_are_the_first_one_token_candidates(decoder_task, tokenizer, monkeypatch):
    monkeypatch.setitem(decoder_task.CLASS_WORDS, "toy", [["xylophone-zebra", "capital"], ["number"]])
    answers = decoder_task.answer_tokens("toy", tokenizer)
    assert answers == [tokenizer(" capital")["input_ids"][0], tokenizer(" number")["input_ids"][0]]
    monkeypatch.setitem(decoder_task.CLASS_WORDS, "toy", [["xylophone-zebra"]])
    with pytest.raises(ValueError, match=r"None of \['xylophone-zebra'\] is one token"):
        decoder_task.answer_tokens("toy", tokenizer)


@pytest.mark.requires_modules(*TASK_DATA_MODULES)  # the corpus holds every task's texts; trec6 and sms evaluate
def test_quick_run_trains_every_method_and_resumes(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "decoder_task.py"), "--quick", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    records = json.loads((tmp_path / "quick.json").read_text())
    methods = {record["method"] for record in records.values()}
    assert methods == {"base model", "RECAST default", "RECAST, 42 row blocks", "RECAST position, 48",
                       "RECAST own_spectrum position, 48", "TinyLoRA tied, u=48", "UniLoRA, 48", "LoRA r=8"}
    spectral = [r for r in records.values() if r["method"] == "RECAST own_spectrum position, 48"]
    assert {r["numbers"] for r in spectral} == {2 * 2 * 4}  # q, v x 2 positions (2 layers) x 4 templates
    shared = [r for r in records.values() if r["method"] == "RECAST position, 48"]
    assert {r["numbers"] for r in shared} == {2 * 2 * 2 * 2}  # q, v x 2 positions x 2 templates x 2 row blocks
    recast = [r for r in records.values() if r["method"] == "RECAST default"]
    assert {r["numbers"] for r in recast} == {16}  # q, v of 2 layers x 2 templates x 2 row blocks
    base = [r for r in records.values() if r["method"] == "base model"]
    assert {r["task"] for r in base} == {"trec6", "sms"} and {r["numbers"] for r in base} == {0}
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == [
        "always the most frequent training class (reference)", "base model", "RECAST default", "RECAST, 42 row blocks",
        "RECAST position, 48", "RECAST own_spectrum position, 48", "TinyLoRA tied, u=48", "UniLoRA, 48", "LoRA r=8",
    ]
    before = (tmp_path / "quick.json").read_text()
    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "quick.json").read_text() == before  # every run was kept: nothing trained again
    assert [line for line in second.stdout.splitlines() if line.startswith("| ")] == [
        line for line in first.stdout.splitlines() if line.startswith("| ")
    ]
    assert "pretraining" not in second.stderr  # the cached base model was reused
