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
def test_quick_run_trains_every_method_and_resumes(tmp_path, decoder_task):
    command = [sys.executable, str(REPO / "benchmarks" / "decoder_task.py"), "--quick", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    records = json.loads((tmp_path / "quick.json").read_text())
    methods = {record["method"] for record in records.values()}
    assert methods == {*decoder_task.BASE_METHODS, *decoder_task.METHODS}
    spectral = [r for r in records.values() if r["method"] == "RECAST own_spectrum position, 48"]
    assert {r["numbers"] for r in spectral} == {2 * 2 * 4}  # q, v x 2 positions (2 layers) x 4 templates
    for method in ("RECAST position, 48", "RECAST spectral_bands position, 48"):
        shared = [r for r in records.values() if r["method"] == method]
        assert {r["numbers"] for r in shared} == {2 * 2 * 2 * 2}  # q, v x 2 positions x 2 templates x 2 row blocks
    # the default's count in three layouts: q, v of 2 layers x 2 templates (or bands) x 2 row blocks, or q, v, up_proj
    # and down_proj of 2 layers x 2 bands x 1 block
    for method in ("RECAST default", "RECAST spectral_bands, 2 bands x 2 blocks, 240",
                   "RECAST spectral_bands q,v,up,down, 2 bands x 1 block, 240"):
        assert {r["numbers"] for r in records.values() if r["method"] == method} == {16}, method
    sixty = [name for name in decoder_task.METHODS if name.endswith(", 60")]
    assert len(sixty) == 11 and {name.split()[0].rstrip(",") for name in sixty} == {"RECAST", "FourierFT", "TinyLoRA"}
    for method in sixty:
        per_module = [r for r in records.values() if r["method"] == method]
        # 2 layers x (one role x 2 templates x 1 block in any family, one role x 1 template x 2 blocks, q, v x 1 x 1,
        # one role x 2 frequencies, or one role x u=2)
        assert {r["numbers"] for r in per_module} == {4}, method
    base = [r for r in records.values() if r["method"] == "base model"]
    assert {r["task"] for r in base} == {"trec6", "sms"} and {r["numbers"] for r in base} == {0}
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == [
        "always the most frequent training class (reference)", *decoder_task.BASE_METHODS, *decoder_task.METHODS]
    assert rows[0].startswith("| method | one rate | numbers | trec6: generated | trec6: among classes | "
                              "sms (held out): generated")
    few_shot = [r for r in records.values() if r["method"] == decoder_task.FEW_SHOT]
    assert {r["task"] for r in few_shot} == {"trec6", "sms"} and {r["numbers"] for r in few_shot} == {0}
    before = (tmp_path / "quick.json").read_text()
    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "quick.json").read_text() == before  # every run was kept: nothing trained again
    assert [line for line in second.stdout.splitlines() if line.startswith("| ")] == [
        line for line in first.stdout.splitlines() if line.startswith("| ")
    ]
    assert "pretraining" not in second.stderr  # the cached base model was reused


def test_in_context_examples_put_one_answered_example_of_each_class_first(decoder_task, tokenizer):
    data = {"train": {"text": ["who wrote hamlet ?", "call me later", "how many legs ?"], "label": [1, 0, 1]}}
    answers = [tokenizer(" number")["input_ids"][0], tokenizer(" capital")["input_ids"][0]]
    ids = decoder_task.in_context_examples(tokenizer, data, "trec6", answers)
    prompt, blank = tokenizer(decoder_task.PROMPT)["input_ids"], tokenizer("\n\n")["input_ids"]
    first = tokenizer("call me later")["input_ids"] + prompt + [answers[0]] + blank  # class 0: its first example
    second = tokenizer("who wrote hamlet ?")["input_ids"] + prompt + [answers[1]] + blank
    assert ids == first + second
    prompts = decoder_task.Prompts(tokenizer, ["how many legs ?"], max_length=5, prefix=ids)
    assert prompts.ids[0][: len(ids)] == ids and prompts.lengths == [len(prompts.ids[0])]


def test_rates_are_chosen_on_the_mean_over_the_tuning_tasks(decoder_task):
    records = [dict(validation_generated=0.2, validation_among_classes=0.5),
               dict(validation_generated=0.6, validation_among_classes=0.7)]
    assert decoder_task.validation(records) == pytest.approx((0.4, 0.6))
    assert decoder_task.validation(records) > decoder_task.validation([records[0], records[0]])


def test_tasks_are_checked_and_the_local_base_leaves_their_texts_out(decoder_task, capsys):
    with pytest.raises(SystemExit):
        decoder_task.arguments(["--tuning", "trec6", "sms", "--held-out", "sms"])
    assert "cannot be both tuned on and held out: ['sms']" in capsys.readouterr().err
    default, more = decoder_task.arguments([]), decoder_task.arguments(["--held-out", "sms", "tweets"])
    assert decoder_task.evaluated_tasks(more) == ("trec6", "sms", "tweets")
    assert decoder_task.base_tag(default) == "v8192-h256-l6-c128-s600"  # the cached base of the default tasks
    assert decoder_task.base_tag(more) == "v8192-h256-l6-c128-s600-without-sms-trec6-tweets"
    smollm2 = decoder_task.arguments(["--base", "smollm2", "--tuning", "trec6", "sms", "--held-out", "tweets"])
    assert decoder_task.base_tag(smollm2) == "smollm2-n1000-b32"  # a base not trained here: the tasks do not matter

