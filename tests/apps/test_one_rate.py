"""The one-rate protocol (`bench --one-rate`): one learning rate per method chosen on the tuning tasks' validation
accuracy, held-out tasks run at that rate only and reported apart, and the gain-over-probe bands."""

import pytest

from peft_recast.apps import arguments, bench
from peft_recast.apps.bench import report
from peft_recast.apps.bench.methods import SMALL_DATA_EPOCHS, SMALL_DATA_TRAIN
from peft_recast.apps.tasks import HELD_OUT_TASKS

from ..helpers import REPO


def _record(results, method, task, lr, seed, protocol, validation, test, trainable=48):
    key = bench.run_key(method, task, lr, seed, protocol)
    results.add(dict(key=key, method=method, task=task, lr=lr, seed=seed, protocol=protocol,
                     validation_accuracy=validation, test_accuracy=test, test_digest=key, trainable=trainable,
                     adapter_bytes=1816, head_params=770))


def test_one_rate_is_the_best_mean_validation_over_tuning_tasks_only(tmp_path):
    settings = bench.BenchSettings(tasks=["trec6", "sms", "clothing"], methods=["recast"], seeds=[0, 1],
                                   one_rate=True)
    results, protocol, method = bench.Results(str(tmp_path / "r.json")), settings.protocol(), bench.METHODS["recast"]
    # per task the best rates differ (trec6: 3e-2, sms: 3e-3); the mean is best at 1e-2; the held-out task's
    # validation (best at 1e-1) and every test accuracy must play no part
    for lr, trec6, sms, clothing in [(3e-3, 0.70, 0.99, 0.5), (1e-2, 0.80, 0.97, 0.5), (3e-2, 0.84, 0.90, 0.5),
                                     (1e-1, 0.60, 0.50, 0.99)]:
        _record(results, "recast", "trec6", lr, 0, protocol, trec6, 1 - trec6)
        _record(results, "recast", "sms", lr, 0, protocol, sms, 1 - sms)
        _record(results, "recast", "clothing", lr, 0, protocol, clothing, 0.0)
    assert settings.tuning_tasks() == ["trec6", "sms"]
    assert bench.one_rate(method, settings, results, protocol) == 1e-2
    for task in settings.tasks:
        assert bench.best_lr(method, task, settings, results, protocol) == 1e-2
    # per-task choice from the same records
    per_task = bench.BenchSettings(tasks=settings.tasks, methods=["recast"], seeds=[0, 1])
    assert [bench.best_lr(method, t, per_task, results, protocol) for t in ("trec6", "sms")] == [3e-2, 3e-3]
    # seed 0 sweeps the tuning tasks only; the held-out task and later seeds run at the one rate
    assert bench.lrs_to_run(method, "trec6", 0, settings, results, protocol) == list(method.lrs)
    assert bench.lrs_to_run(method, "clothing", 0, settings, results, protocol) == [1e-2]
    assert bench.lrs_to_run(method, "sms", 1, settings, results, protocol) == [1e-2]
    # --lrs: seed 0 runs those rates instead of the grid; every rate with records still competes for the one rate
    settings.lrs = [1e-3]
    assert bench.lrs_to_run(method, "trec6", 0, settings, results, protocol) == [1e-3]
    assert bench.lrs_to_run(method, "sms", 1, settings, results, protocol) == [1e-2]
    assert bench.one_rate(method, settings, results, protocol) == 1e-2
    assert arguments.bench_settings(arguments.build_parser().parse_args(["bench", "--lrs", "0.001", "0.003"])).lrs == [1e-3, 3e-3]


def test_a_rate_missing_on_a_tuning_task_does_not_compete(tmp_path):
    settings = bench.BenchSettings(tasks=["trec6", "sms"], methods=["recast"], seeds=[0], one_rate=True)
    results, protocol, method = bench.Results(str(tmp_path / "r.json")), settings.protocol(), bench.METHODS["recast"]
    with pytest.raises(RuntimeError, match="every tuning task"):
        bench.one_rate(method, settings, results, protocol)
    _record(results, "recast", "trec6", 1e-1, 0, protocol, 0.99, 0.5)  # trec6 only
    _record(results, "recast", "trec6", 3e-3, 0, protocol, 0.70, 0.5)
    _record(results, "recast", "sms", 3e-3, 0, protocol, 0.70, 0.5)
    assert bench.one_rate(method, settings, results, protocol) == 3e-3
    held_out_only = bench.BenchSettings(tasks=list(HELD_OUT_TASKS), methods=["recast"], seeds=[0], one_rate=True)
    with pytest.raises(ValueError, match="every task of this run is held out"):
        bench.one_rate(method, held_out_only, results, protocol)


def test_chain_puts_the_tuning_tasks_first_with_one_rate():
    tasks = ["clothing", "trec6", "healthnews", "sms"]
    assert bench.BenchSettings(tasks=tasks, one_rate=True).chain_tasks() == ["trec6", "sms", "clothing", "healthnews"]
    assert bench.BenchSettings(tasks=tasks).chain_tasks() == tasks


def test_table_reports_held_out_tasks_apart_and_bands_are_gains_over_the_probe(tmp_path):
    settings = bench.BenchSettings(tasks=["clothing", "trec6", "sms"], methods=["probe", "recast"], seeds=[0, 1],
                                   one_rate=True)
    results, protocol = bench.Results(str(tmp_path / "r.json")), settings.protocol()
    for task, probe in (("trec6", 0.70), ("sms", 0.90), ("clothing", 0.60)):
        for seed in (0, 1):
            _record(results, "probe", task, 0.0, seed, protocol, probe, probe + 0.01 * seed)
            _record(results, "recast", task, 1e-2, seed, protocol, probe + 0.1, probe + 0.05 + 0.01 * seed)
        _record(results, "recast", task, 3e-2, 0, protocol, probe, probe - 0.02)
    rows = report.summarise(settings, results)
    recast = next(row for row in rows if row["method"] == "recast")
    assert recast["lrs"] == {"clothing": 1e-2, "trec6": 1e-2, "sms": 1e-2}
    assert recast["mean"] == pytest.approx((75.5 + 95.5) / 2)  # tuning tasks only
    assert recast["held_out_mean"] == pytest.approx(65.5)
    table = report.format_table(rows, {}, settings.tasks)
    header = table.splitlines()[0]
    assert header.index("| trec6 |") < header.index("| sms |") < header.index("| mean |") < header.index(
        "clothing (held out)") < header.index("held-out mean")
    assert "| 75.5 ± 0.7 | 95.5 ± 0.7 | 85.5 | 65.5 ± 0.7 | 65.5 |" in table
    gains = report.gain_over_probe(settings, results, "recast")
    assert gains["trec6"][1e-2] == pytest.approx(5.0) and gains["trec6"][3e-2] == pytest.approx(-2.0)
    assert set(gains) == {"clothing", "trec6", "sms"}
    path = tmp_path / "band.png"
    report.plot_gain_bands({"recast": gains}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "one learning rate for every task" in report.describe_protocol(settings)


def test_small_data_and_one_rate_options_set_the_protocol():
    args = arguments.build_parser().parse_args(["bench", "--small-data", "--one-rate", "--task", "trec6", "clothing"])
    settings = arguments.bench_settings(args)
    assert (settings.max_train, settings.epochs, settings.one_rate) == (SMALL_DATA_TRAIN, SMALL_DATA_EPOCHS, True)
    assert settings.protocol()["max_train"] == 1000 and settings.protocol()["epochs"] == 3


def test_head_first_changes_the_run_key_and_not_the_config():
    plain, first = bench.METHODS["recast"], bench.METHODS["recast-hf"]
    assert plain.config().to_dict() == first.config().to_dict() and first.head_first
    keys = [bench.run_key(name, "trec6", 1e-2, 0, {"epochs": 3}) for name in ("recast", "recast-hf")]
    assert keys[0].split("_")[-1] != keys[1].split("_")[-1]


def test_table_gives_the_mean_and_range_of_counts_that_differ_by_task(tmp_path):
    # a gated adapter keeps a different number of modules on each task: the table must not show one task's count
    settings = bench.BenchSettings(tasks=["trec6", "sms"], methods=["recast-gates-48", "recast"], seeds=[0],
                                   one_rate=True)
    results, protocol = bench.Results(str(tmp_path / "r.json")), settings.protocol()
    for task, kept in [("trec6", 40), ("sms", 24)]:
        _record(results, "recast-gates-48", task, 1e-2, 0, protocol, 0.9, 0.8, trainable=kept)
        _record(results, "recast", task, 1e-2, 0, protocol, 0.9, 0.8)
    gated, plain = report.summarise(settings, results)
    assert (gated["trainable"], gated["trainable_range"]) == (32, (24, 40))
    assert (plain["trainable"], plain["trainable_range"]) == (48, (48, 48))
    table = report.format_table([gated, plain], {}, settings.tasks).splitlines()
    assert "| 32 (mean; 24-40) |" in table[2] and "| 48 |" in table[3]


def test_a_method_missing_a_task_at_its_chosen_rate_is_named_not_dropped_silently(tmp_path, capsys):
    # validation picks 3e-3 for recast, but its held-out task ran only at 1e-2: no row, and a line says why
    settings = bench.BenchSettings(tasks=["trec6", "clothing"], methods=["recast", "probe", "vera"], seeds=[0],
                                   one_rate=True)
    results, protocol = bench.Results(str(tmp_path / "r.json")), settings.protocol()
    for lr, validation in ((3e-3, 0.9), (1e-2, 0.8)):
        _record(results, "recast", "trec6", lr, 0, protocol, validation, 0.8)
    _record(results, "recast", "clothing", 1e-2, 0, protocol, 0.7, 0.7)
    for task in ("trec6", "clothing"):
        _record(results, "probe", task, 0.0, 0, protocol, 0.6, 0.6)
    rows = report.summarise(settings, results)
    assert [row["method"] for row in rows] == ["probe"]
    printed = capsys.readouterr().out
    assert "recast left out of the table" in printed and "clothing (no run at its chosen rate 0.003)" in printed
    assert "vera" not in printed  # a method with no record at all is simply not in this results file


def test_a_rate_that_ran_outside_todays_grid_still_competes(tmp_path):
    """Records made under an earlier grid: validation chooses among every rate that ran, not only today's grid."""
    settings = bench.BenchSettings(tasks=["trec6"], methods=["recast"], seeds=[0, 1])
    results, protocol, method = bench.Results(str(tmp_path / "r.json")), settings.protocol(), bench.METHODS["recast"]
    assert 0.3 not in method.lrs
    for lr, validation in ((1e-2, 0.80), (0.3, 0.85)):
        _record(results, "recast", "trec6", lr, 0, protocol, validation, 0.5)
    assert bench.best_lr(method, "trec6", settings, results, protocol) == 0.3
    assert bench.lrs_to_run(method, "trec6", 1, settings, results, protocol) == [0.3]
    assert bench.lrs_to_run(method, "trec6", 0, settings, results, protocol) == list(method.lrs)  # sweeps its grid


def test_edge_note_names_a_choice_at_the_edge_of_the_rates_that_ran():
    assert report.edge_note({1e-2: 0.8}) == "0.01, the only rate that ran"
    assert report.edge_note({3e-3: 0.9, 1e-2: 0.8, 3e-2: 0.7}) == "0.003, the lowest of 0.003, 0.01, 0.03"
    assert report.edge_note({3e-3: 0.7, 1e-2: 0.8, 3e-2: 0.8}) is None  # the tie goes to the smaller rate, inside
    assert report.edge_note({3e-3: 0.7, 1e-2: 0.8, 3e-2: 0.9}) == "0.03, the highest of 0.003, 0.01, 0.03"


SMALL_DATA = REPO / "docs" / "benchmarks" / "small-data-cpu" / "results.json"


def test_each_one_rate_the_shipped_records_give_lies_inside_the_rates_that_ran_or_is_flagged(tmp_path):
    """On the shipped small-data records (one rate per method over the six tuning tasks, seed 0): the report's rate is
    the best mean validation accuracy recomputed here from the raw records, and the report flags it exactly when it is
    the lowest or highest of the rates that ran on every tuning task, or the only one."""
    settings = bench.BenchSettings(
        tasks=["trec6", "sms", "tweets", "amazon", "election", "newsgroups", "clothing", "healthnews"],
        methods=list(bench.METHODS), seeds=[0], one_rate=True, max_train=SMALL_DATA_TRAIN, epochs=SMALL_DATA_EPOCHS)
    protocol, tuning = settings.protocol(), settings.tuning_tasks()
    results = bench.Results(str(tmp_path / "r.json"))
    results.merge(str(SMALL_DATA))
    validation: dict[tuple[str, float], dict[str, float]] = {}
    for key, record in results.runs.items():  # today's runs: superseded configs' records keep keys of their own
        if record["seed"] == 0 and key == bench.run_key(record["method"], record["task"], record["lr"], 0, protocol):
            validation.setdefault((record["method"], record["lr"]), {})[record["task"]] = record["validation_accuracy"]
    edges = report.rates_at_the_edge(settings, results)
    inside = []
    for name, method in bench.METHODS.items():
        means = {lr: sum(scores[task] for task in tuning) / len(tuning) for (owner, lr), scores in validation.items()
                 if owner == name and all(task in scores for task in tuning)}
        if method.kind == "probe" or not means:
            assert name not in edges
            continue
        rates = sorted(means)
        chosen = max(rates, key=lambda lr: means[lr])  # the first best in ascending order: ties go to the smaller
        assert bench.one_rate(method, settings, results, protocol) == chosen, name
        at_edge = len(rates) == 1 or chosen in (rates[0], rates[-1])
        assert (name in edges) == at_edge, name
        if not at_edge:
            inside.append(name)
    # what these records hold: the recommended recipe, the all-linear rungs with the head first (3e-3, 1e-3 run too),
    # ladder-1000, and ranked channels and gates at 144 and 1,000 chose inside their grids; ranked channels at 216 ran
    # one rate
    for name, rate in (("recast-hf", 1e-2), ("recast-216-hf", 3e-3), ("recast-648-hf", 3e-3),
                       ("recast-984-blocks", 1e-2), ("recast-ch-144", 1e-2), ("recast-gates-144", 1e-2),
                       ("recast-ch-1000", 1e-2), ("recast-gates-1000", 1e-2)):
        assert name in inside and bench.one_rate(bench.METHODS[name], settings, results, protocol) == rate, name
    assert edges["recast-ch-216"] == ["0.01, the only rate that ran"]
    assert len(inside) >= 20 and len(edges) >= 10


def test_probe_candidate_takes_the_probe_where_its_validation_is_higher_and_changes_the_rate(tmp_path):
    from peft_recast.apps.bench.results import probe_candidates

    settings = bench.BenchSettings(tasks=["trec6", "sms", "clothing"], methods=["probe", "recast"], seeds=[0, 1],
                                   one_rate=True)
    results, protocol = bench.Results(str(tmp_path / bench.RESULTS_FILE)), settings.protocol()
    for task in settings.tasks:
        for seed in (0, 1):
            _record(results, "probe", task, 0.0, seed, protocol, 0.80, 0.70 + 0.01 * seed)
            _record(results, "recast", task, 1e-2, seed, protocol, 0.85, 0.90)  # above the probe: kept
            _record(results, "recast", task, 3e-2, seed, protocol, 0.99 if task == "trec6" else 0.60, 0.20)
        _record(results, "recast", task, 3e-3, 0, protocol, 0.80, 0.10)  # a tie keeps the run
    other = dict(protocol, epochs=protocol["epochs"] + 1)  # a probe of another protocol is no candidate
    _record(results, "recast", "trec6", 1e-2, 0, other, 0.10, 0.10)
    before = {key: dict(record) for key, record in results.runs.items()}
    method = bench.METHODS["recast"]
    assert bench.one_rate(method, settings, results, protocol) == 1e-2  # (0.85 + 0.85) / 2 beats (0.99 + 0.60) / 2

    view = probe_candidates(results, protocol)
    assert results.runs == before  # the records themselves are untouched
    low = view.runs[bench.run_key("recast", "sms", 3e-2, 1, protocol)]
    assert low["probe_chosen"] and (low["validation_accuracy"], low["test_accuracy"]) == (0.80, 0.71)
    assert low["test_digest"] == bench.run_key("probe", "sms", 0.0, 1, protocol)
    for kept in (bench.run_key("recast", "trec6", 3e-2, 0, protocol), bench.run_key("recast", "sms", 1e-2, 0, protocol),
                 bench.run_key("recast", "sms", 3e-3, 0, protocol), bench.run_key("recast", "trec6", 1e-2, 0, other)):
        assert view.runs[kept] == before[kept]
    # with the probe as a candidate sms at 3e-2 counts the probe's 0.80: (0.99 + 0.80) / 2 beats 1e-2's 0.85
    assert bench.one_rate(method, settings, view, protocol) == 3e-2
    with pytest.raises(RuntimeError, match="not a results file"):
        view.save()

    for flag in ([], ["--probe-candidate"]):
        args = arguments.build_parser().parse_args(["bench", "--report", "--one-rate", "--seeds", "0", "1", "--task",
                                              *settings.tasks, "--method", "probe", "recast", "--output-dir",
                                              str(tmp_path), *flag])
        rows = bench.run_bench(arguments.bench_settings(args), costs=False, train=False)["rows"]
        recast = next(row for row in rows if row["method"] == "recast")
        assert recast["lrs"]["trec6"] == (3e-2 if flag else 1e-2)
        assert recast["mean"] == pytest.approx((20.0 + 70.5) / 2 if flag else 90.0)  # sms: the probe's test
        assert recast["held_out_mean"] == pytest.approx(70.5 if flag else 90.0)
        gains = (tmp_path / report.GAINS_FILE).read_text()  # 3e-3, 1e-2, 3e-2; sms at 3e-2 is the probe with the flag
        assert "| method | task | 0.003 | 0.01 | 0.03 |" in gains
        assert f"| recast | sms | -60.00 | +19.50 | {'+0.00' if flag else '-50.50'} |" in gains
    assert "validation chooses between each run and the probe" in (tmp_path / "table.md").read_text()
