"""`benchmarks/decoder_arithmetic.py`: exact-answer arithmetic trained with TRL's SFT and GRPO trainers."""

import json

import pytest

from ..helpers import import_benchmark


@pytest.fixture(scope="module")
def arithmetic():
    return import_benchmark("decoder_arithmetic")


def test_the_reward_is_one_exactly_when_the_last_integer_is_the_answer(arithmetic):
    completions = ["17", "12 + 5 = 17", "17 apples, or 18", "-3", "seventeen", [{"role": "assistant", "content": "x=17"}]]
    answers = [17, 17, 17, -3, 17, 17]
    assert arithmetic.exact_answer(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_problems_are_distinct_correct_and_never_both_trained_on_and_held_back(arithmetic):
    train, held_back = arithmetic.problems()
    assert (len(train), len(held_back)) == (arithmetic.TRAIN, arithmetic.HELD_BACK)
    assert not {q for q, _ in train} & {q for q, _ in held_back}
    for question, answer in train + held_back:
        expression = question.removeprefix("What is ").split("?")[0]
        assert eval(expression) == answer >= 0  # a difference is never negative
    assert arithmetic.problems() == (train, held_back)  # the same on every run


def test_quick_run_trains_each_method_with_sft_and_grpo_and_resumes(arithmetic, tmp_path, capsys, monkeypatch):
    records = arithmetic.main(["--quick", "--out", str(tmp_path)])
    runs = [r for key, r in records.items() if key != "base"]
    assert {(r["stage"], r["method"]) for r in runs} == {(s, m) for s in arithmetic.STAGES for m in arithmetic.METHODS}
    for r in runs:
        assert r["numbers"] > 0 and r["steps"] == 2 and len(r["training_log"]) == 2
        assert 0 <= r["held_back_reward"] <= 100
    assert {r["numbers"] for r in runs if r["method"].startswith("TinyLoRA")} == {48}
    stored = json.loads((tmp_path / "arithmetic-quick.json").read_text())
    assert stored == json.loads(json.dumps(records))
    printed = capsys.readouterr().out
    assert printed.count("| SFT |") == printed.count("| GRPO |") == len(arithmetic.METHODS)
    # a second call reads every run back instead of training again
    monkeypatch.setattr(arithmetic, "run", lambda *a, **k: pytest.fail("trained again"))
    assert arithmetic.main(["--quick", "--out", str(tmp_path)]) == records
