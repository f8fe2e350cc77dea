"""`peft-recast bench`: the protocol's bookkeeping, the cost measurements, and a short end-to-end run that resumes."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from peft_recast.apps import arguments, bench, cli
from peft_recast.apps.bench import runner
from peft_recast.apps.bench.methods import SMALL_DATA_EPOCHS, SMALL_DATA_TRAIN
from peft_recast.apps.encoder import new_head

from ..helpers import REPO, TokenBatches
from ..models import EmbeddingEncoder, tiny_bert


def test_run_key_names_a_safe_adapter_and_changes_with_protocol_and_config():
    key = bench.run_key("recast", "trec6", 1e-2, 0, {"epochs": 4})
    assert key.startswith("recast_trec6_lr0_01_seed0_") and key.replace("_", "").isalnum()
    assert key == bench.run_key("recast", "trec6", 1e-2, 0, {"epochs": 4})
    assert key != bench.run_key("recast", "trec6", 1e-2, 0, {"epochs": 3})
    assert key.split("_")[-1] != bench.run_key("recast-216", "trec6", 1e-2, 0, {"epochs": 4}).split("_")[-1]
    assert key.split("_")[-1] != bench.run_key("recast-24", "trec6", 1e-2, 0, {"epochs": 4}).split("_")[-1]


def test_run_key_changes_with_the_layernorm_alignment_stage():
    """``recast-ln`` and ``recast-ln-2stage`` share their PEFT config; the alignment stage alone changes the digest."""
    joint, staged = bench.METHODS["recast-ln"], bench.METHODS["recast-ln-2stage"]
    assert joint.config().to_dict() == staged.config().to_dict()
    assert (joint.align_epochs, staged.align_epochs) == (0, 1)
    keys = [bench.run_key(name, "trec6", 1e-2, 0, {"epochs": 4}) for name in ("recast-ln", "recast-ln-2stage")]
    assert keys[0].startswith("recast_ln_trec6_lr0_01_seed0_")
    assert keys[1].startswith("recast_ln_2stage_trec6_lr0_01_seed0_")
    assert keys[0].split("_")[-1] != keys[1].split("_")[-1]  # the digests


def test_best_lr_is_chosen_on_validation_never_test(tmp_path):
    settings = bench.BenchSettings(tasks=["trec6"], methods=["recast"], seeds=[0, 1])
    results = bench.Results(str(tmp_path / "results.json"))
    protocol = settings.protocol()
    for lr, validation, test in [(3e-3, 0.80, 0.99), (1e-2, 0.85, 0.70), (3e-2, 0.85, 0.60)]:
        key = bench.run_key("recast", "trec6", lr, 0, protocol)
        results.add(dict(key=key, validation_accuracy=validation, test_accuracy=test))
    chosen = bench.best_lr(bench.METHODS["recast"], "trec6", settings, results, protocol)
    assert chosen == 1e-2  # best validation; the tie goes to the smaller rate; test accuracy plays no part
    assert bench.lrs_to_run(bench.METHODS["recast"], "trec6", 1, settings, results, protocol) == [1e-2]
    reloaded = bench.Results(str(tmp_path / "results.json"))
    assert reloaded.runs == results.runs
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_two_writers_of_one_results_file_keep_each_others_records(tmp_path):
    """Two benches writing one ``results.json`` (each read it before the other's runs): every run, cost and forgetting
    check of both is in the file, and a writer's own record wins over the file's copy of the same key."""
    path = str(tmp_path / "results.json")
    first, second = bench.Results(path), bench.Results(path)
    first.add(dict(key="a", validation_accuracy=0.5))
    first.forgetting["recast/seed0"] = {"trec6": {"lr": 0.01}}
    second.costs["lora-r8"] = {"step_seconds": 1.0}
    second.add(dict(key="b", validation_accuracy=0.6))
    first.add(dict(key="c", validation_accuracy=0.7))
    second.forgetting["recast/seed0"] = {"sms": {"lr": 0.01}}
    second.add(dict(key="a", validation_accuracy=0.9))
    reloaded = bench.Results(path)
    assert {key: run["validation_accuracy"] for key, run in reloaded.runs.items()} == {"a": 0.9, "b": 0.6, "c": 0.7}
    assert reloaded.costs == {"lora-r8": {"step_seconds": 1.0}}
    assert reloaded.forgetting == {"recast/seed0": {"trec6": {"lr": 0.01}, "sms": {"lr": 0.01}}}


def test_training_memory_counts_activations_gradients_and_optimizer_state():
    model = EmbeddingEncoder(vocab=10, width=8)
    model.embed.requires_grad_(False)
    head = nn.Linear(8, 2)
    params = list(model.layer.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = {"input_ids": torch.randint(0, 10, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    measured = bench.training_memory(model, head, batch, optimizer)
    numbers = sum(p.numel() for p in params)
    # gradients + two AdamW moments (+ step counters) + at least the linear layer's saved input (4 x 5 x 8 floats)
    assert measured >= 3 * 4 * numbers + 4 * 5 * 8 * 4
    assert measured < 3 * 4 * numbers + 64 * 4 * 5 * 8 * 4


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    arguments.add_bench_arguments(parser)
    args = parser.parse_args(["--device", "cpu"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def _forbid_training(monkeypatch, message: str):
    """Make every training entry point (adapter runs and the probe) fail with ``message``; returns the stand-in."""

    def no_training(*args, **kwargs):
        raise AssertionError(message)

    monkeypatch.setattr(runner, "train_run", no_training)
    monkeypatch.setattr(runner, "_probe_run", no_training)
    return no_training


def test_quick_settings_and_overrides():
    settings = arguments.bench_settings(_args(quick=True))
    assert settings.tasks == list(bench.QUICK_TASKS) and settings.methods == list(bench.QUICK_METHODS)
    assert settings.seeds == [0] and not settings.sweep and settings.max_train == 500
    settings = arguments.bench_settings(_args(quick=True, task=["bbc"], max_train=10))
    assert settings.tasks == ["bbc"] and settings.max_train == 10
    settings = arguments.bench_settings(_args(ladder=True))
    assert settings.methods == list(bench.LADDER_METHODS) and settings.sweep and settings.seeds == [0, 1, 2]
    assert {bench.METHODS[m].kind for m in settings.methods} == {"probe", "peft"}
    with pytest.raises(SystemExit, match="Unknown task"):
        arguments.bench_settings(_args(task=["imdb"]))


def test_short_benchmark_runs_checks_forgetting_and_resumes(tmp_path, monkeypatch, capsys):
    args = _args(quick=True, method=["probe", "recast", "lora-r8"], max_train=32, max_eval=32, epochs=1,
                 cost_repeats=1, output_dir=str(tmp_path))
    assert cli.run_bench_command(args) == 0
    with open(tmp_path / bench.RESULTS_FILE) as handle:
        saved = json.load(handle)
    assert len(saved["runs"]) == 3 * 2  # 3 methods x 2 tasks, one seed, no sweep
    recast = [run for run in saved["runs"].values() if run["method"] == "recast"]
    assert {run["trainable"] for run in recast} == {48}  # the default: ladder-48
    assert all(0 < run["adapter_bytes"] < 4096 for run in recast)
    assert all(run["trainable"] == 73_728 for run in saved["runs"].values() if run["method"] == "lora-r8")
    for chain in saved["forgetting"].values():
        for task in chain.values():
            assert task["predictions_unchanged"] and task["reloaded_predictions_unchanged"]
            assert task["accuracy_after_last_task"] == task["accuracy_after_training"]
    costs = saved["costs"]
    assert costs["lora-r8"]["step_ratio"] == pytest.approx(1.0)
    recast_cost, lora_cost = costs["recast"], costs["lora-r8"]
    assert recast_cost["trainable"] == 48
    assert recast_cost["memory_ratio"] == pytest.approx(
        recast_cost["training_memory_bytes"] / lora_cost["training_memory_bytes"]
    )
    # the coefficients' gradients need each adapted layer's input kept for backward: at least one float32
    # (batch x length x 384) hidden state per layer of MiniLM-L6 (its query and value read the same one)
    batch, length = costs["_settings"]["batch"]
    assert recast_cost["training_memory_bytes"] >= 6 * batch * length * 384 * 4
    table = (tmp_path / bench.TABLE_FILE).read_text()
    assert "RECAST default" in table and "LoRA r=8" in table
    # both adapters ran a mixed-task batch (a method that refuses `adapter_names` records None, shown "n/a"), and the
    # table shows the measured throughput ratio
    for name in ("recast", "lora-r8"):
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {bench.METHODS[name].label} |")]
        assert row.endswith(f" | {costs[name]['mixed_batch_throughput_ratio']:.2f}x |"), row
    assert (tmp_path / bench.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

    # resume: nothing is trained again, adapters come back from disk, and the table is the same
    no_training = _forbid_training(monkeypatch, "a finished run was trained again")
    assert cli.run_bench_command(_args(**{**vars(args), "no_costs": True})) == 0
    assert (tmp_path / bench.TABLE_FILE).read_text() == table  # costs are kept from the first run

    # a later run of a subset keeps the other methods' forgetting checks and costs
    assert cli.run_bench_command(_args(**{**vars(args), "method": ["probe"], "no_costs": True})) == 0
    with open(tmp_path / bench.RESULTS_FILE) as handle:
        after_subset = json.load(handle)
    assert after_subset["forgetting"].keys() == saved["forgetting"].keys()
    assert after_subset["costs"] == saved["costs"]

    # --report trains and re-tests nothing (merged results from elsewhere), and writes the same table
    monkeypatch.setattr(runner, "check_forgetting", no_training)
    (tmp_path / bench.TABLE_FILE).unlink()
    assert cli.run_bench_command(_args(**{**vars(args), "report": True})) == 0
    assert (tmp_path / bench.TABLE_FILE).read_text() == table
    assert "Forgetting: 3 method x seed chains" in capsys.readouterr().out


def test_ladder_rungs_train_the_numbers_their_names_say_on_minilm():
    import peft

    from peft_recast.apps.encoder import load_encoder

    for size in bench.LADDER_SIZES:
        for name in (f"recast-{size}" if size != 48 else "recast", f"fourierft-{size}"):
            model = peft.get_peft_model(load_encoder(torch.device("cpu")), bench.METHODS[name].config())
            assert model.get_nb_trainable_parameters()[0] == size, name


def test_ladder_presets_are_the_benchmarked_rungs():
    import peft

    from peft_recast import RecastConfig
    from peft_recast.apps.encoder import load_encoder
    from peft_recast.presets import RECAST_LADDER

    benchmarked = {"ladder-48": ("recast", 48), "ladder-1000": ("recast-984-blocks", 984)}  # 1,000: at most
    for name, fields in RECAST_LADDER.items():
        method_name, size = benchmarked.get(name, (f"recast-{name.split('-')[1]}", int(name.split("-")[1])))
        method = bench.METHODS[method_name]
        assert {k: v for k, v in method.config().to_dict().items() if k in fields} == fields
        configured = {k: v for k, v in method.config().to_dict().items() if k != "preset"}
        assert configured == {k: v for k, v in RecastConfig.from_preset(name).to_dict().items() if k != "preset"}
        model = peft.get_peft_model(load_encoder(torch.device("cpu")), RecastConfig.from_preset(name))
        assert model.get_nb_trainable_parameters()[0] == size, name


@pytest.mark.parametrize("name, size", [("bands-24-qv-mlp", 24), ("bands-48-qv-mlp", 48), ("bands-144-qv-mlp", 144)])
def test_bands_presets_are_the_benchmarked_rungs(name, size):
    """``RecastConfig.from_preset(name)`` adapts MiniLM-L6 as the bench method of that name: the same modules, family,
    bands and blocks, and the numbers its name says."""
    import peft

    from peft_recast import RecastConfig
    from peft_recast.apps.encoder import load_encoder

    benchmarked = peft.get_peft_model(load_encoder(torch.device("cpu")), bench.METHODS[name].config())
    preset = peft.get_peft_model(load_encoder(torch.device("cpu")), RecastConfig.from_preset(name))
    assert sorted(benchmarked.targeted_module_names) == sorted(preset.targeted_module_names)
    fields = ("template_family", "num_templates", "coefficient_blocks", "layers_per_group", "coefficient_scale")
    assert [getattr(benchmarked.peft_config["default"], field) for field in fields] == [
        getattr(preset.peft_config["default"], field) for field in fields]
    assert benchmarked.get_nb_trainable_parameters()[0] == preset.get_nb_trainable_parameters()[0] == size


def test_bands_methods_on_query_value_and_the_mlp_train_the_numbers_their_names_say_on_minilm():
    import peft

    from peft_recast.apps.encoder import load_encoder

    names = [name for name in bench.METHODS if name.startswith("bands-") and "-qv-mlp" in name]
    assert len(names) >= 5
    for name in names:
        model = peft.get_peft_model(load_encoder(torch.device("cpu")), bench.METHODS[name].config())
        assert model.get_nb_trainable_parameters()[0] == int(name.split("-")[1]), name


def test_run_key_is_the_same_in_every_process():
    """PEFT stores ``target_modules`` as a set, whose order changes with ``PYTHONHASHSEED``; a resumed benchmark in a
    new process must still find its runs."""
    code = ("from peft_recast.apps import bench; p = bench.BenchSettings().protocol(); "
            "print(*[bench.run_key(m, 'trec6', 1e-3, 0, p) for m in ('lora-r8', 'vblora', 'fourierft-144', 'recast')])")
    keys = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in range(6)}
    assert len(keys) == 1


def test_merged_records_are_not_retrained_and_chains_are_saved_as_they_finish(tmp_path, monkeypatch):
    """Results merged from another machine (a GPU run whose adapters stayed there) are kept as they are; a benchmark
    stopped in its second chain keeps the first chain's forgetting check."""
    args = _args(quick=True, method=["recast", "lora-r8"], task=["trec6"], max_train=32, max_eval=32, epochs=1,
                 no_costs=True, output_dir=str(tmp_path / "elsewhere"))
    check_forgetting = runner.check_forgetting

    def stopped_in_second_chain(model, method, *rest):
        if method.name == "lora-r8":
            raise KeyboardInterrupt
        return check_forgetting(model, method, *rest)

    monkeypatch.setattr(runner, "check_forgetting", stopped_in_second_chain)
    with pytest.raises(KeyboardInterrupt):
        cli.run_bench_command(args)
    with open(tmp_path / "elsewhere" / bench.RESULTS_FILE) as handle:
        stopped = json.load(handle)
    assert list(stopped["forgetting"]) == ["recast/seed0"] and len(stopped["runs"]) == 2
    monkeypatch.setattr(runner, "check_forgetting", check_forgetting)

    # the records alone (--merge), without the runs/ folder, in a new output dir: nothing is trained or re-tested
    _forbid_training(monkeypatch, "a merged run was trained again")
    merged = tmp_path / "merged"
    assert cli.run_bench_command(_args(**{**vars(args), "output_dir": str(merged),
                               "merge": [str(tmp_path / "elsewhere" / bench.RESULTS_FILE)]})) == 0
    with open(merged / bench.RESULTS_FILE) as handle:
        after = json.load(handle)
    assert after["runs"] == stopped["runs"] and after["forgetting"] == stopped["forgetting"]
    assert "LoRA r=8" in (merged / bench.TABLE_FILE).read_text()


def test_merge_refuses_a_file_that_is_not_benchmark_results(tmp_path):
    other = tmp_path / "adapter_config.json"
    other.write_text(json.dumps({"peft_type": "RECAST"}))
    results = bench.Results(str(tmp_path / bench.RESULTS_FILE))
    with pytest.raises(ValueError, match="not a benchmark results file"):
        results.merge(str(other))
    assert results.runs == {} and not (tmp_path / bench.RESULTS_FILE).exists()


def test_costs_only_trains_nothing_and_reports_the_timers_medians_and_their_quotients(tmp_path, monkeypatch):
    """``--costs-only`` trains nothing; each step time is the median of what the timer measured over the rounds, each
    ratio the quotient of those medians, and the table prints the ratios of the methods with records."""
    from peft_recast.apps import runtime
    from peft_recast.apps.bench import costs as costs_module

    _forbid_training(monkeypatch, "--costs-only trained a run")
    args = _args(quick=True, method=["recast", "lora-r8"], cost_repeats=3, costs_only=True, output_dir=str(tmp_path))
    settings = arguments.bench_settings(args)
    results = bench.Results(str(tmp_path / bench.RESULTS_FILE))
    for name in ("recast", "lora-r8"):
        for task in settings.tasks:
            key = bench.run_key(name, task, bench.METHODS[name].default_lr, 0, settings.protocol())
            results.add(dict(key=key, method=name, task=task, lr=bench.METHODS[name].default_lr, seed=0,
                             protocol=settings.protocol(), validation_accuracy=0.8, test_accuracy=0.8,
                             trainable=48, adapter_bytes=1816, head_params=770))
    # the timer's readings: per method (known by the numbers it trains) one step time per round, in round order;
    # 0.05 s for every forward pass (bare, unmerged, merged, single- and mixed-task batches). Nothing is computed:
    # every figure comes from the timer (the end-to-end test above measures for real).
    step_times = {48: [0.9, 0.3, 0.2], 73_728: [0.1, 0.5, 0.4]}  # medians 0.3 and 0.4
    stepped = []

    def step(encoder, *rest):
        stepped.append(sum(p.numel() for p in encoder.parameters() if p.requires_grad))

    def timer(function, device):
        stepped.clear()
        function()
        return step_times[stepped[0]].pop(0) if stepped else 0.05

    monkeypatch.setattr(costs_module, "train_step", step)
    monkeypatch.setattr(costs_module, "sentence_logits", lambda *args, **kwargs: None)
    monkeypatch.setattr(runtime, "timed", timer)
    assert cli.run_bench_command(args) == 0
    assert step_times == {48: [], 73_728: []}  # every round timed one step of each method
    with open(tmp_path / bench.RESULTS_FILE) as handle:
        saved = json.load(handle)
    assert len(saved["runs"]) == 4 and saved["forgetting"] == {}
    recast, lora = saved["costs"]["recast"], saved["costs"]["lora-r8"]
    assert recast["trainable"] == 48 and lora["trainable"] == 73_728
    assert (recast["step_seconds"], lora["step_seconds"]) == (0.3, 0.4)
    assert recast["step_ratio"] == 0.3 / 0.4 and lora["step_ratio"] == 1.0
    assert recast["memory_ratio"] == recast["training_memory_bytes"] / lora["training_memory_bytes"]
    assert saved["costs"]["_bare_forward_seconds"] == 0.05
    for cost in (recast, lora):
        assert cost["unmerged_latency_ratio"] == cost["merged_latency_ratio"] == 1.0
        assert cost["mixed_batch_throughput_ratio"] == 1.0
    table = (tmp_path / bench.TABLE_FILE).read_text()
    for name, step_ratio in (("recast", "0.75x"), ("lora-r8", "1.00x")):
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {bench.METHODS[name].label} |")]
        memory = f"{saved['costs'][name]['memory_ratio']:.2f}x"
        assert row.endswith(f" | {step_ratio} | {memory} | 1.00x / 1.00x | 1.00x |"), row


def _train_with_snapshots(monkeypatch, method_name: str, epochs: int) -> tuple[list, int]:
    """``train_run`` of ``method_name`` on a tiny BERT (16 texts, batches of 4): the RECAST coefficients, the
    LayerNorm copies and the head before every step and after the last; and the steps per epoch."""
    import peft

    from peft_recast.apps import loop, tasks


    method = bench.METHODS[method_name]
    encoder = peft.get_peft_model(tiny_bert(), method.config())
    head = new_head(32, 3, 0, torch.device("cpu"))
    texts, labels = TokenBatches(16), torch.arange(16) % 3
    data = tasks.TaskData("tiny", ["a", "b", "c"], texts, texts, texts, labels, labels, labels)
    parts = {
        "coefficients": [p for n, p in encoder.named_parameters() if "recast_coefficients" in n],
        "layernorms": [p for n, p in encoder.named_parameters() if "modules_to_save" in n],
        "head": list(head.parameters()),
    }
    assert parts["coefficients"] and len(parts["layernorms"]) == 2 * 9  # 9 LayerNorms of a 4-layer BERT, 2 tensors

    def snapshot():
        snapshots.append({part: torch.cat([p.detach().flatten() for p in params]) for part, params in parts.items()})

    snapshots = []
    monkeypatch.setattr(loop, "tick", snapshot)  # called before each step
    settings = bench.BenchSettings(epochs=epochs, batch_size=4)
    bench.train_run(encoder, head, data, 1e-2, 0, settings, "test", method.align_epochs)
    snapshot()
    assert all(p.requires_grad for p in parts["coefficients"])  # released for the stage after alignment
    return snapshots, 16 // 4


def test_layernorm_alignment_stage_trains_only_the_layernorm_copies_and_the_head_first(monkeypatch):
    """``recast-ln-2stage``: during its first epoch the RECAST coefficients stay at their initial zeros while the
    LayerNorm copies (``modules_to_save``) and the head train; from the second epoch on the coefficients train too.
    ``recast-ln`` (no alignment stage) trains all of them from the first step."""
    snapshots, per_epoch = _train_with_snapshots(monkeypatch, "recast-ln-2stage", epochs=2)
    assert len(snapshots) == 2 * per_epoch + 1
    start = snapshots[0]
    assert not start["coefficients"].any()
    for after in snapshots[1 : per_epoch + 1]:  # the alignment epoch
        assert torch.equal(after["coefficients"], start["coefficients"])
        assert not torch.equal(after["layernorms"], start["layernorms"]) and not torch.equal(after["head"], start["head"])
    assert not torch.equal(snapshots[per_epoch + 1]["coefficients"], start["coefficients"])  # the first released step
    assert not torch.equal(snapshots[-1]["layernorms"], snapshots[per_epoch]["layernorms"])  # LayerNorms keep training

    snapshots, _ = _train_with_snapshots(monkeypatch, "recast-ln", epochs=2)
    for part in ("coefficients", "layernorms", "head"):
        assert not torch.equal(snapshots[1][part], snapshots[0][part]), part


def test_alignment_stage_as_long_as_the_run_is_refused_and_nothing_stays_frozen(monkeypatch):
    with pytest.raises(ValueError, match="leaves no epoch for the other adapter parameters"):
        _train_with_snapshots(monkeypatch, "recast-ln-2stage", epochs=1)


def test_merge_keeps_forgetting_checks_of_other_tasks_of_the_same_chain(tmp_path):
    check = dict(lr=0.01, accuracy_after_training=0.9, accuracy_after_last_task=0.9, predictions_unchanged=True,
                 reloaded_predictions_unchanged=True)
    for shard, task in (("a", "trec6"), ("b", "sms")):
        results = bench.Results(str(tmp_path / shard / bench.RESULTS_FILE))
        os.makedirs(tmp_path / shard)
        results.forgetting["recast/seed0"] = {task: check}
        results.save()
    merged = bench.Results(str(tmp_path / bench.RESULTS_FILE))
    for shard in ("a", "b"):
        merged.merge(str(tmp_path / shard / bench.RESULTS_FILE))
    assert merged.forgetting == {"recast/seed0": {"trec6": check, "sms": check}}


def test_channel_methods_rank_on_the_task_train_their_count_and_reload(tmp_path):
    settings = bench.BenchSettings(tasks=["trec6", "sms"], methods=["recast-ch-48"], seeds=[0], sweep=False,
                                   epochs=1, max_train=64, max_eval=32, output_dir=str(tmp_path))
    bench.run_bench(settings, costs=False)
    with open(tmp_path / bench.RESULTS_FILE) as handle:
        saved = json.load(handle)
    assert [run["trainable"] for run in saved["runs"].values()] == [48, 48]  # ladder-24 + 12 rows x 2 templates
    chosen = []
    for key in saved["runs"]:
        with open(tmp_path / "runs" / key / "adapter_config.json") as handle:
            channels = json.load(handle)["channels"]
        assert sum(map(len, channels.values())) == 12
        assert not any(name.endswith("_ranking") for name in os.listdir(tmp_path / "runs" / key))
        chosen.append(channels)
    assert chosen[0] != chosen[1]  # ranked on each task's own data
    for task in saved["forgetting"]["recast-ch-48/seed0"].values():
        assert task["predictions_unchanged"] and task["reloaded_predictions_unchanged"]


def _run_gated_and_close(tmp_path, monkeypatch, gates_to_close) -> tuple[str, dict]:
    """One short ``recast-gates-48`` run on trec6 whose training ends by zeroing the gate scores that
    ``gates_to_close(encoder)`` returns (as a penalty would on the full protocol); checks the forgetting report and
    returns the run's key and record."""
    trained = runner.train_run

    def train_and_close(encoder, *args, **kwargs):
        seconds = trained(encoder, *args, **kwargs)
        for scores in gates_to_close(encoder):
            scores.data.fill_(0.0)
        return seconds

    monkeypatch.setattr(runner, "train_run", train_and_close)
    settings = bench.BenchSettings(tasks=["trec6"], methods=["recast-gates-48"], seeds=[0], sweep=False,
                                   epochs=1, max_train=64, max_eval=32, output_dir=str(tmp_path))
    bench.run_bench(settings, costs=False)
    with open(tmp_path / bench.RESULTS_FILE) as handle:
        saved = json.load(handle)
    (key, run), = saved["runs"].items()
    for task in saved["forgetting"]["recast-gates-48/seed0"].values():
        assert task["predictions_unchanged"] and task["reloaded_predictions_unchanged"]
    return key, run


def test_gated_methods_prune_before_saving_and_count_the_open_modules(tmp_path, monkeypatch):
    def two_gates(encoder):
        layers = encoder.base_model.model.encoder.layer
        return [layer.recast_gate_scores[encoder.active_adapter]
                for layer in (layers[5].attention.self.value, layers[0].attention.self.query)]

    key, run = _run_gated_and_close(tmp_path, monkeypatch, two_gates)
    with open(tmp_path / "runs" / key / "adapter_config.json") as handle:
        config = json.load(handle)
    assert config["inactive_modules"] == ["encoder.layer.0.attention.self.query", "encoder.layer.5.attention.self.value"]
    assert not config["module_gates"]
    assert run["trainable"] == 48 - 2 * 4  # 2 templates x 2 blocks per open module


def test_a_gated_run_whose_gates_all_closed_counts_no_numbers_and_still_reloads(tmp_path, monkeypatch):
    """Every gate closed: the adapter computes the pretrained encoder, so the record counts 0 numbers (not the unused
    coefficients and scores), and the saved gated adapter still reloads to the same predictions."""
    def every_gate(encoder):
        return [parameter for name, parameter in encoder.named_parameters() if "recast_gate_scores" in name]

    key, run = _run_gated_and_close(tmp_path, monkeypatch, every_gate)
    assert run["trainable"] == 0
    with open(tmp_path / "runs" / key / "adapter_config.json") as handle:
        assert json.load(handle)["module_gates"]  # kept as trained: prune_gates refuses to drop every module


def test_controls_of_the_ranked_channels_train_the_numbers_their_names_say_on_minilm():
    import peft

    from peft_recast.apps.encoder import load_encoder

    controls = [*[(f"recast-{size}-hf", size) for size in (24, 144, 216, 648)], ("recast-1008-blocks", 1008),
                ("recast-48-b4-hf", 48)]
    for name, size in controls:
        model = peft.get_peft_model(load_encoder(torch.device("cpu")), bench.METHODS[name].config())
        assert model.get_nb_trainable_parameters()[0] == size, name
        assert bench.METHODS[name].head_first, name
    assert {name: bench.METHODS[name].channels for name in bench.METHODS if name.startswith("recast-ch-")} == {
        **{f"recast-ch-{size}": (size - (24 if size == 48 else 48)) // 2 for size in (48, 144, 216, 648, 1000)},
        "recast-ch-984-ln": (984 - 48 - 768) // 2}


def test_bank_methods_mix_templates_of_one_bank_over_all_query_and_value_weights_on_minilm():
    import peft

    from peft_recast import recast_summary
    from peft_recast.apps.encoder import load_encoder

    for size in (48, 144):
        method = bench.METHODS[f"recast-bank-{size}-hf"]
        model = peft.get_peft_model(load_encoder(torch.device("cpu")), method.config())
        assert model.get_nb_trainable_parameters()[0] == size and method.head_first
        (group,) = recast_summary(model).groups  # every query and value of the 6 layers in one bank
        assert (group.modules, group.templates, group.coefficients) == (12, size // 12, size)


def test_gated_methods_gate_their_rung_and_train_one_score_per_module_more_on_minilm():
    import peft

    from peft_recast.apps.encoder import load_encoder

    gated = {name for name in bench.METHODS if name.startswith("recast-gates-")}
    assert gated == {f"recast-gates-{size}" for size in (48, 144, 216, 648, 1000)} | {
        "recast-gates-144-l15", "recast-gates-144-l30"}
    assert [bench.METHODS[f"recast-gates-144-l{tag}"].config().gate_penalty for tag in (15, 30)] == [0.15, 0.3]
    for size in (144, 1000, "144-l30"):  # 12 q,v modules: their coefficients plus one gate score each
        method = bench.METHODS[f"recast-gates-{size}"]
        config = method.config()
        assert config.module_gates and method.head_first
        model = peft.get_peft_model(load_encoder(torch.device("cpu")), config)
        assert model.get_nb_trainable_parameters()[0] == (1008 if size == 1000 else 144) + 12


def test_layernorm_stage_runs_before_the_ranking_and_the_channels_train_after_it(tmp_path, monkeypatch):
    """``recast-ch-984-ln``: epoch 1 trains only the embeddings' LayerNorm copy and the head; the channels are ranked
    on that aligned model (coefficients still 0, LayerNorm moved); epoch 2 trains all 984 numbers; the run reloads."""
    seen = {}
    ranked = runner.rank_channels

    def rank_and_look(encoder, *args, **kwargs):
        layernorm = encoder.base_model.model.embeddings.LayerNorm
        seen["layernorm_moved"] = not torch.equal(layernorm.modules_to_save[encoder.active_adapter].weight,
                                                  layernorm.original_module.weight)
        seen["coefficients_zero"] = all(not p.any() for name, p in encoder.named_parameters()
                                        if "recast_coefficients" in name)
        seen["frozen"] = [name for name, p in encoder.named_parameters() if "recast_coefficients" in name
                          and not p.requires_grad]
        return ranked(encoder, *args, **kwargs)

    monkeypatch.setattr(runner, "rank_channels", rank_and_look)
    settings = bench.BenchSettings(tasks=["trec6"], methods=["recast-ch-984-ln"], seeds=[0], sweep=False,
                                   epochs=2, max_train=64, max_eval=32, output_dir=str(tmp_path))
    bench.run_bench(settings, costs=False)
    assert seen == dict(layernorm_moved=True, coefficients_zero=True, frozen=[])
    with open(tmp_path / bench.RESULTS_FILE) as handle:
        saved = json.load(handle)
    (key, run), = saved["runs"].items()
    assert run["trainable"] == 984
    with open(tmp_path / "runs" / key / "adapter_config.json") as handle:
        assert sum(map(len, json.load(handle)["channels"].values())) == 84
    for task in saved["forgetting"]["recast-ch-984-ln/seed0"].values():
        assert task["predictions_unchanged"] and task["reloaded_predictions_unchanged"]

    settings = dataclasses.replace(settings, epochs=1, output_dir=str(tmp_path / "one-epoch"))
    with pytest.raises(ValueError, match="leaves no epoch for ranking and training the channels"):
        bench.run_bench(settings, costs=False)


def test_accuracy_plot_joins_the_rungs_of_each_family_and_names_the_families(tmp_path, monkeypatch):
    from peft_recast.apps.bench import report

    assert [report.method_family(name) for name in ("unilora-144-hf", "recast-ch-48", "recast-24", "recast", "probe")] \
        == ["unilora-hf", "recast-ch", "recast", "recast", "probe"]
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path: figures.append(figure))

    def row(method, numbers, mean):
        return dict(method=method, label=method, trainable=numbers, mean=mean, tasks={"trec6": dict(spread=0.5)})

    report.plot_accuracy([row("probe", 0, 70.0), row("recast-hf", 48, 80.0), row("recast-144-hf", 144, 82.0),
                          row("unilora-48-hf", 48, 78.0)], str(tmp_path / "plot.png"))
    (axis,) = figures[0].axes
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["probe", "recast-hf", "unilora-hf"]
    lines = {container.get_label(): container.lines[0] for container in axis.containers}  # errorbar: (line, ...)
    assert list(lines["recast-hf"].get_xdata()) == [48, 144] and list(lines["recast-hf"].get_ydata()) == [80.0, 82.0]
    assert list(lines["probe"].get_xdata()) == [1]  # plotted at 1 on the log axis


def test_legend_names_rungs_by_the_words_they_share_and_their_numbers():
    from peft_recast.apps.bench import report

    def row(label, numbers):
        return dict(method=f"m-{numbers}", label=label, trainable=numbers)

    parted = [row("RECAST bands, q,v and the MLP layers, 1 band (its own weight) x 1 block, head first", 24),
              row("RECAST bands, q,v and the MLP layers, 2 bands x 3 blocks, head first", 144)]
    assert report.legend_label("recast-bands", parted) == "RECAST bands, q,v and the MLP layers, 24-144 numbers"
    ranged = [row("FourierFT, 2 frequencies, q,v", 24), row("FourierFT, 72 frequencies, q,v", 864)]
    assert report.legend_label("fourierft", ranged) == "FourierFT, 2-72 frequencies, q,v"


# ---- the methods as experiment files -------------------------------------------------------------------------------


def _write_experiments(root, families, files):
    """An experiments folder: ``families.json`` from ``families`` ({family: [names]}) and ``files`` ({path: data})."""
    root.mkdir()
    (root / "families.json").write_text(json.dumps(
        [{"family": family, "about": f"the {family} family", "methods": names} for family, names in families.items()]))
    for path, data in files.items():
        (root / path).parent.mkdir(exist_ok=True)
        (root / path).write_text(json.dumps(data))
    return root


def _experiment(name, **changes):
    return {"name": name, "label": name.upper(), "kind": "peft", "lrs": [0.001, 0.01], "default_lr": 0.01,
            "peft_config": {"class": "LoraConfig", "kwargs": {"r": 2, "target_modules": ["query"]}}, **changes}


def test_experiment_files_are_read_in_their_families_order_with_fresh_configs(tmp_path):
    from peft_recast.apps.bench.methods import load_methods

    root = _write_experiments(tmp_path / "experiments", {"b": ["m2", "m1"], "a": ["m3"]}, {
        "b/m1.json": _experiment("m1", head_first=True, channels=4),
        "b/m2.json": _experiment("m2", align_epochs=1),
        "a/m3.json": _experiment("m3", kind="probe", peft_config=None, lrs=[], default_lr=0.0)})
    methods, families = load_methods(root)
    assert list(methods) == ["m2", "m1", "m3"] and list(families) == ["b", "a"]
    assert families["b"].about == "the b family" and families["b"].methods == ("m2", "m1")
    m1 = methods["m1"]
    assert (m1.label, m1.kind, m1.lrs, m1.default_lr, m1.family) == ("M1", "peft", (0.001, 0.01), 0.01, "b")
    assert (m1.head_first, m1.channels, m1.align_epochs, methods["m2"].align_epochs) == (True, 4, 0, 1)
    first, second = m1.config(), m1.config()
    assert type(first).__name__ == "LoraConfig" and first.r == 2 and first is not second
    first.target_modules.add("value")  # a config a caller changes leaves the next one as the file says
    assert m1.config().target_modules == {"query"} and methods["m3"].config() is None


@pytest.mark.parametrize("problem, families, files", [
    ("not listed", {"a": ["m1"]}, {"a/m1.json": _experiment("m1"), "a/m2.json": _experiment("m2")}),
    ("does not exist", {"a": ["m1", "m2"]}, {"a/m1.json": _experiment("m1")}),
    ("must be its file name", {"a": ["m1"]}, {"a/m1.json": _experiment("m9")}),
    ("appear once", {"a": ["m1"], "b": ["m1"]}, {"a/m1.json": _experiment("m1"), "b/m1.json": _experiment("m1")}),
    ("optionally", {"a": ["m1"]}, {"a/m1.json": _experiment("m1", seeds=[0])}),
    ("is not in its grid", {"a": ["m1"]}, {"a/m1.json": _experiment("m1", default_lr=0.1)}),
    ("is not one of", {"a": ["m1"]}, {"a/m1.json": _experiment("m1", kind="adapter")}),
    ("have none", {"a": ["m1"]}, {"a/m1.json": _experiment("m1", kind="full")}),
    ("must be bool", {"a": ["m1"]}, {"a/m1.json": _experiment("m1", head_first=1)}),
])
def test_experiment_files_that_do_not_describe_one_method_each_are_refused(tmp_path, problem, families, files):
    from peft_recast.apps.bench.methods import load_methods

    with pytest.raises(ValueError, match=problem):
        load_methods(_write_experiments(tmp_path / "experiments", families, files))


def test_shipped_experiments_build_their_configs_and_hold_no_results():
    root = REPO / "peft_recast" / "apps" / "bench" / "experiments"
    listed = [name for family in bench.FAMILIES.values() for name in family.methods]
    assert listed == list(bench.METHODS) and len(listed) == len(set(listed))
    assert {path.relative_to(root).as_posix() for path in root.glob("*/*.json")} == {
        f"{method.family}/{name}.json" for name, method in bench.METHODS.items()}
    for name, method in bench.METHODS.items():
        config = method.config()
        assert (config is None) == (method.kind != "peft"), name
        if config is not None:
            assert config.to_dict()  # every config class and keyword exists in this PEFT
        data = json.loads((root / method.family / f"{name}.json").read_text())
        assert not re.search(r"issue|20\d\d-\d\d|measured|\+\d", json.dumps(data)), name  # no history, no results
    assert bench.METHODS["recast"].config().to_dict() == __import__("peft_recast").RecastConfig().to_dict()


def test_channel_methods_are_named_for_channels():
    ranked = {name: method for name, method in bench.METHODS.items() if method.channels}
    assert set(ranked) == set(bench.FAMILIES["recast-channels"].methods)
    assert all("ranked channels" in method.label and "rows" not in method.label for method in ranked.values())
    assert not [method.label for method in bench.METHODS.values() if "ranked rows" in method.label]


def test_method_help_lists_every_method_once_under_its_family_in_plain_text():
    from peft_recast.apps.bench.methods import method_families_help

    text = method_families_help()
    assert not re.search(r"[`*#]|\]\(", text)  # no Markdown
    listed, family = [], None
    for line in text.splitlines():
        if line.startswith("    "):
            listed += [(family, name) for name in line.split()]
        else:
            family, about = line.split(": ", 1)
            assert about == bench.FAMILIES[family].about
    assert listed == [(method.family, name) for name, method in bench.METHODS.items()]


# ---- run keys of the shipped records and the tables they redraw ----------------------------------------------------

SHIPPED = REPO / "docs" / "benchmarks"


def test_records_keyed_before_later_options_are_read_under_todays_key(tmp_path):
    from peft_recast.apps.bench import results as results_module

    protocol = bench.BenchSettings().protocol()
    options = json.loads((REPO / "peft_recast/apps/bench/experiments/added_options.json").read_text())["RecastConfig"]
    last = frozenset(options[-1])
    earlier = results_module._key("recast", "trec6", 0.01, 0, results_module._digest("recast", protocol, last))
    today = bench.run_key("recast", "trec6", 0.01, 0, protocol)
    assert earlier != today
    record = dict(key=earlier, method="recast", task="trec6", lr=0.01, seed=0, protocol=protocol,
                  validation_accuracy=0.9, test_accuracy=0.8)
    stale = dict(record, key="recast_trec6_lr0_01_seed0_00000000")  # another config: not today's run
    shard = tmp_path / "shard.json"
    shard.write_text(json.dumps({"runs": {earlier: record, stale["key"]: stale}}))
    results = bench.Results(str(tmp_path / bench.RESULTS_FILE))
    results.merge(str(shard))
    assert results.runs[today] == dict(record, key=today, recorded_key=earlier)
    assert results.runs[stale["key"]] == stale and earlier not in results.runs
    assert bench.Results(str(tmp_path / bench.RESULTS_FILE)).runs == results.runs  # saved under today's key
    # a method that sets one of the options left out has no earlier key: its runs could not have been made without it
    assert results_module.earlier_digests("spectrum-48", json.dumps(protocol, sort_keys=True)) == ()
    assert len(results_module.earlier_digests("recast", json.dumps(protocol, sort_keys=True))) == len(options)


def test_every_recast_record_of_the_h200_run_is_read_under_todays_key(tmp_path):
    results = bench.Results(str(tmp_path / bench.RESULTS_FILE))
    results.merge(str(SHIPPED / "minilm-h200-3-seeds.json"))
    stale = [key for key, r in results.runs.items()
             if key != bench.run_key(r["method"], r["task"], r["lr"], r["seed"], r["protocol"])]
    assert stale == [] and len(results.runs) == 708
    assert sum("recorded_key" in record for record in results.runs.values()) == 346  # every RECAST record


def _shipped_tables() -> list:
    """(records, table) for each table shipped beside the records it was drawn from: ``table*.md`` beside a
    ``results.json``, ``<name>.md`` beside ``<name>.json``."""
    pairs = []
    for records in sorted(SHIPPED.rglob("*.json")):
        tables = (sorted(records.parent.glob("table*.md")) if records.name == bench.RESULTS_FILE
                  else [path for path in [records.with_suffix(".md")] if path.exists()])
        pairs += [(records, table) for table in tables]
    return pairs


def _redraw_argv(records, table, output_dir) -> list[str]:
    """``peft-recast bench --report`` for ``table``: its tasks (header), methods (rows, by label), seeds, rate rule
    and protocol (first line), from ``records``."""
    from peft_recast.apps.tasks import TASKS

    lines = table.read_text().splitlines()
    protocol, header = lines[0], [cell.strip() for cell in lines[2].strip("|").split("|")]
    tasks = [cell.removesuffix(" (held out)") for cell in header if cell.removesuffix(" (held out)") in TASKS]
    names = {method.label: name for name, method in bench.METHODS.items()}
    methods = [names[line.split(" | ")[0].removeprefix("| ")] for line in lines[4:] if line.startswith("| ")]
    seeds = re.search(r"over (\d+) seeds", protocol)
    seeds = [str(seed) for seed in range(int(seeds.group(1)))] if seeds else [re.search(r"one seed \((\d+)\)",
                                                                                        protocol).group(1)]
    argv = ["bench", "--report", "--merge", str(records), "--output-dir", str(output_dir), "--threads", "1",
            "--task", *tasks, "--method", *methods, "--seeds", *seeds]
    if "one learning rate for every task" in protocol:
        argv.append("--one-rate")
    if f"{SMALL_DATA_TRAIN:,} training examples per task, {SMALL_DATA_EPOCHS} epochs" in protocol:
        argv.append("--small-data")
    return argv


def test_some_tables_are_shipped_beside_their_records():
    assert {f"{records.name} -> {table.name}" for records, table in _shipped_tables()} >= {
        "results.json -> table.md", "results.json -> table-3-seeds.md",
        "minilm-h200-3-seeds.json -> minilm-h200-3-seeds.md"}


@pytest.mark.parametrize("records, table", _shipped_tables(), ids=lambda path: path.relative_to(SHIPPED).as_posix())
def test_shipped_table_is_what_the_report_redraws_from_the_shipped_records(tmp_path, monkeypatch, records, table):
    monkeypatch.setattr(runner, "check_forgetting", _forbid_training(monkeypatch, "--report trained or re-tested"))
    assert cli.main(_redraw_argv(records, table, tmp_path)) == 0
    assert (tmp_path / bench.TABLE_FILE).read_text() == table.read_text()


def test_documented_redraw_of_the_h200_run_reproduces_its_table(tmp_path, capsys):
    """The command docs/benchmarks.md gives for the H200 records (all methods; the five tasks that ran), and the hint
    the same command prints without ``--task`` (the default tasks include ones these records never ran)."""
    records = SHIPPED / "minilm-h200-3-seeds.json"
    argv = ["bench", "--report", "--merge", str(records), "--threads", "1"]
    tasks = ["--task", "trec6", "sms", "bbc", "tweets", "amazon"]
    assert cli.main([*argv, *tasks, "--output-dir", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / bench.TABLE_FILE).read_text() == records.with_suffix(".md").read_text()
    capsys.readouterr()
    assert cli.main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "the records under it hold amazon, bbc, sms, trec6, tweets: name those with --task" in printed
