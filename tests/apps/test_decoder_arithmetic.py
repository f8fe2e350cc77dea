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
    assert arithmetic.worked("What is 56 - 8? Reply with the number only.", 48) == "56 - 8 = 48"
    targets = [arithmetic.worked(question, answer) for question, answer in train]
    assert arithmetic.exact_answer(targets, answer=[answer for _, answer in train]) == [1.0] * len(train)


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


def test_each_method_runs_at_its_one_rate_and_the_factor_scales_every_rate_alike(arithmetic):
    plain, tenth = arithmetic.arguments([]), arithmetic.arguments(["--rate-factor", "0.1"])
    for method, (_, one_rate) in arithmetic.METHODS.items():
        assert arithmetic.rate(plain, method) == one_rate
        assert arithmetic.rate(tenth, method) == pytest.approx(one_rate / 10)
    assert arithmetic.rate(plain, "RECAST position, 48") == 1e-2  # recommended_lr of the config


def test_a_grpo_temperature_other_than_one_gets_records_of_its_own_and_reaches_the_trainer(arithmetic, tmp_path,
                                                                                          capsys, monkeypatch):
    plain, cooler = arithmetic.arguments([]), arithmetic.arguments(["--temperature", "0.5"])
    method = "RECAST position, 48"
    # records made before the option keep their keys; SFT samples nothing, so its key never changes
    assert arithmetic.run_key(plain, "GRPO", method, 0) == f"GRPO/{method}/0.01/0/60"
    assert arithmetic.run_key(cooler, "GRPO", method, 0) == f"GRPO/{method}/0.01/0/60/t0.5"
    assert arithmetic.run_key(cooler, "SFT", method, 0) == arithmetic.run_key(plain, "SFT", method, 0)
    with pytest.raises(SystemExit):
        arithmetic.arguments(["--temperature", "0"])
    seen = []
    real = arithmetic.GRPOConfig
    monkeypatch.setattr(arithmetic, "GRPOConfig", lambda **kwargs: seen.append(kwargs["temperature"]) or real(**kwargs))
    records = arithmetic.main(["--quick", "--out", str(tmp_path), "--stages", "GRPO", "--temperature", "0.5",
                               "--methods", method])
    assert seen == [0.5] and f"| GRPO, temperature 0.5 | {method} (seed 0) |" in capsys.readouterr().out
    assert records[f"GRPO/{method}/0.01/0/2/t0.5"]["temperature"] == 0.5
