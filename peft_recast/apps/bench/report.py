"""The benchmark's table and plots, from the records in ``results.json``."""

from __future__ import annotations

import difflib
import re
import statistics
from typing import Optional, Sequence

from ...files import atomic_write
from ..tasks import HELD_OUT_TASKS
from .methods import METHODS
from .results import BenchSettings, Results, best_lr, chosen_rate, rates_run, run_key, validation_means

TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_parameters.png"
LR_PLOT_FILE = "accuracy_vs_learning_rate.png"
BAND_PLOT_FILE = "gain_over_probe_vs_learning_rate.png"
GAINS_FILE = "gain_over_probe_by_rate.md"


def summarise(settings: BenchSettings, results: Results) -> list[dict]:
    """Per method: numbers, bytes, and test accuracy per task at the chosen rate (mean and spread over seeds).

    Numbers and bytes are means over the runs: a gated adapter keeps a different count on each task, and
    ``trainable_range`` gives the smallest and largest count. A method with records for only some tasks gets no row,
    and a printed line names the tasks it lacks."""
    protocol = settings.protocol()
    rows = []
    for name in settings.methods:
        method = METHODS[name]
        row = dict(method=name, label=method.label, tasks={}, lrs={})
        counted, missing = [], []
        for task in settings.tasks:
            try:
                lr = best_lr(method, task, settings, results, protocol)
            except RuntimeError:
                missing.append(f"{task} (no run at any rate)")
                continue
            records = [results.runs.get(run_key(name, task, lr, seed, protocol)) for seed in settings.seeds]
            records = [r for r in records if r is not None]
            if not records:
                missing.append(f"{task} (no run at its chosen rate {lr:g})")
                continue
            accuracies = [100 * r["test_accuracy"] for r in records]
            row["tasks"][task] = dict(mean=statistics.mean(accuracies),
                                      spread=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                                      seeds=len(accuracies))
            row["lrs"][task] = lr
            counted += records
        if len(row["tasks"]) == len(settings.tasks):
            trainable = [r["trainable"] for r in counted]
            row.update(trainable=round(statistics.mean(trainable)), trainable_range=(min(trainable), max(trainable)),
                       adapter_bytes=round(statistics.mean(r["adapter_bytes"] for r in counted)),
                       head_params=counted[0]["head_params"])
            tuning = [v["mean"] for t, v in row["tasks"].items() if t not in HELD_OUT_TASKS]
            held_out = [v["mean"] for t, v in row["tasks"].items() if t in HELD_OUT_TASKS]
            row["mean"] = statistics.mean(tuning or held_out)
            row["held_out_mean"] = statistics.mean(held_out) if held_out and tuning else None
            rows.append(row)
        elif counted:
            print(f"{name} left out of the table: it has no test record for {', '.join(missing)}; "
                  f"run those tasks to give it a row.")
    return rows


def edge_note(means: dict[float, float]) -> Optional[str]:
    """Why the rate chosen from ``means`` (rate -> mean validation accuracy) may not be the method's best: it is the
    only rate that ran, or the lowest or highest of them; ``None`` when it lies strictly inside."""
    rates, chosen = sorted(means), chosen_rate(means)
    if len(rates) == 1:
        return f"{chosen:g}, the only rate that ran"
    if chosen in (rates[0], rates[-1]):
        edge = "lowest" if chosen == rates[0] else "highest"
        return f"{chosen:g}, the {edge} of {', '.join(f'{lr:g}' for lr in rates)}"
    return None


def rates_at_the_edge(settings: BenchSettings, results: Results) -> dict[str, list[str]]:
    """Per method: its rate choices at the edge of the rates that ran (:func:`edge_note`): the one rate over the tuning
    tasks with ``settings.one_rate``, else each task's, the tasks with the same note named after it. Methods whose
    every choice lies inside are left out, and so is everything without a sweep."""
    if not settings.sweep:
        return {}
    protocol, edges = settings.protocol(), {}
    choices = [(None, settings.tuning_tasks())] if settings.one_rate else [(task, [task]) for task in settings.tasks]
    for name in settings.methods:
        method = METHODS[name]
        if method.kind == "probe":
            continue
        notes: dict[str, list[str]] = {}
        for task, tasks in choices:
            means = validation_means(method, tasks, settings, results, protocol) if tasks else {}
            note = edge_note(means) if means else None
            if note:
                notes.setdefault(note, []).extend([task] if task else [])
        if notes:
            edges[name] = [f"{note} ({', '.join(tasks)})" if tasks else note for note, tasks in notes.items()]
    return edges


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _count(row: dict) -> str:
    """The trainable numbers: one count, or the mean and range where the runs kept different counts (gates)."""
    low, high = row["trainable_range"]
    return f"{row['trainable']:,}" if low == high else f"{row['trainable']:,} (mean; {low:,}-{high:,})"


def format_table(rows: list[dict], costs: dict, tasks: Sequence[str]) -> str:
    """Markdown: accuracy per task (mean +- spread over seeds) and mean, numbers, bytes, and the cost ratios; held-out
    tasks (``HELD_OUT_TASKS``) come after the mean of the others, with a mean of their own."""
    held_out = [t for t in tasks if t in HELD_OUT_TASKS]
    tuning = [t for t in tasks if t not in HELD_OUT_TASKS]
    if tuning and held_out:
        tasks = [*tuning, *held_out]
    apart = ["held-out mean"] if tuning and held_out else []
    tuning_columns = len(tuning) if apart else len(tasks)
    header = ["method", "trainable numbers", "adapter bytes", *tasks[:tuning_columns], "mean",
              *[f"{t} (held out)" for t in tasks[tuning_columns:]], *apart, "seeds", "step time vs LoRA r=8",
              "train memory vs LoRA r=8", "latency unmerged / merged vs base", "mixed-task batch throughput vs one-task batch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cost = costs.get(row["method"], {})
        accuracies = [f"{row['tasks'][t]['mean']:.1f}" + (f" ± {row['tasks'][t]['spread']:.1f}"
                                                          if row["tasks"][t]["seeds"] > 1 else "") for t in tasks]
        latency = (f"{_ratio(cost.get('unmerged_latency_ratio'))} / {_ratio(cost.get('merged_latency_ratio'))}"
                   if cost else "")
        lines.append("| " + " | ".join([
            row["label"], _count(row), f"{row['adapter_bytes']:,}", *accuracies[:tuning_columns],
            f"{row['mean']:.1f}", *accuracies[tuning_columns:], *[f"{row['held_out_mean']:.1f}" for _ in apart],
            str(min(v["seeds"] for v in row["tasks"].values())),
            _ratio(cost.get("step_ratio")) if cost else "", _ratio(cost.get("memory_ratio")) if cost else "",
            latency, _ratio(cost.get("mixed_batch_throughput_ratio")) if cost else "",
        ]) + " |")
    return "\n".join(lines)


def new_figure():
    """A figure and its axes for a PNG written by :func:`save_figure` (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def short_label(label: str) -> str:
    """A method's label without its details in brackets: ``"LoRA r=8, q,v"`` -> ``"LoRA r=8"``."""
    return label.split(" (")[0].split(", ")[0]


def describe_protocol(settings: BenchSettings) -> str:
    """One sentence on what the table's accuracies are: seeds, learning rates and training examples."""
    seeds = (f"mean ± standard deviation over {len(settings.seeds)} seeds" if len(settings.seeds) > 1
             else f"one seed ({settings.seeds[0]})")
    rates = ("each method at one learning rate for every task, the best mean validation accuracy over the tuning "
             "tasks at seed 0" if settings.one_rate else "learning rate chosen per task on validation from each "
             "method's grid") if settings.sweep else "each method at its default learning rate (no sweep)"
    examples = f"{settings.max_train:,}" if settings.max_train else "up to 2,000"
    candidate = "; validation chooses between each run and the probe of its task and seed" if settings.probe_candidate \
        else ""
    return (f"Test accuracy (%), {seeds}; {rates}; {examples} training examples per task, {settings.epochs} "
            f"epochs{candidate}")


def method_family(name: str) -> str:
    """A method's name without its count, what its rungs share: ``"unilora-144-hf"`` -> ``"unilora-hf"``,
    ``"recast-ch-48"`` -> ``"recast-ch"``, ``"recast-24"`` -> ``"recast"``."""
    return "-".join(part for part in name.split("-") if not part.isdigit())


def is_recast(name: str) -> bool:
    """Whether method ``name`` is a RECAST adapter (its experiment folder is one of the ``recast-*`` families, e.g.
    ``"bands-48"`` in ``recast-bands``), which the plots draw apart from the other methods."""
    return METHODS[name].family.startswith("recast")


def _numbers_as_ranges(labels: Sequence[str]) -> Optional[str]:
    """Labels that differ only in their numbers, as one with each differing number written as the range:
    ``"FourierFT, 2 frequencies, q,v"`` and ``"FourierFT, 72 frequencies, q,v"`` -> ``"FourierFT, 2-72 frequencies,
    q,v"``; ``None`` where they differ in more."""
    parts = [re.split(r"(\d+(?:\.\d+)?)", label) for label in labels]
    if len({tuple(split[0::2]) for split in parts}) != 1:
        return None
    merged = list(parts[0])
    for index in range(1, len(merged), 2):
        values = sorted({split[index] for split in parts}, key=float)
        merged[index] = values[0] if len(values) == 1 else f"{values[0]}-{values[-1]}"
    return "".join(merged)


def _shared_words(labels: Sequence[str]) -> str:
    """The words every label has, in order, "…" where the labels part: runs of two or more words, and a first word
    every label starts with. ``"RECAST ladder-24, head first"`` and ``"RECAST default, head first (probe, ...)"`` ->
    ``"RECAST … head first"``."""
    runs = [labels[0].split()]
    for label in labels[1:]:
        common = [word for run in runs for word in (*run, None)]  # None: where earlier labels parted, matches nothing
        blocks = difflib.SequenceMatcher(None, common, label.split(), autojunk=False).get_matching_blocks()
        runs = [common[start:start + size] for start, _, size in blocks if size]
    first = {label.split()[0] for label in labels}
    kept = [run for index, run in enumerate(runs) if len(run) > 1 or (index == 0 and len(first) == 1 and run == [*first])]
    return " … ".join(" ".join(run) for run in kept)


def legend_label(family: str, members: Sequence[dict]) -> str:
    """How the accuracy plot's legend names a family's line, in the table's words (the rows' ``label``): one row's
    label, the rungs' labels with their differing numbers as ranges, or else the words all of them share (details in
    brackets left out) and the range of trainable numbers. Rows made without a label of their own (``label`` = the method name) are named by family."""
    labels = [row["label"] for row in members]
    if all(row["label"] == row["method"] for row in members):
        return family
    merged = _numbers_as_ranges(labels)
    if merged is not None:
        return merged
    low, high = min(row["trainable"] for row in members), max(row["trainable"] for row in members)
    shared = _shared_words([label.split(" (")[0] for label in labels]).rstrip(" ,")  # details in brackets left out
    return f"{shared}, {low:,}" + (f"-{high:,} numbers" if high > low else " numbers")


def plot_accuracy(rows: list[dict], path: str) -> None:
    """Mean test accuracy against trainable numbers (log scale; head not counted): the rungs of one family
    (:func:`method_family`) joined by a line, named in the legend in the table's words (:func:`legend_label`); RECAST
    stands out (thick solid lines with circles in warm colours, bold in the legend) from the other methods (thin dashed
    lines with squares in cool colours; the legend lists the probe, then RECAST, then the others); the probe's accuracy
    is a dotted horizontal line; bars are the mean spread over seeds."""
    import matplotlib.pyplot as plt

    figure, axis = new_figure()
    figure.set_size_inches(8, 5)  # the axes and labels; the figure grows by the legend's width below
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(method_family(row["method"]), []).append(row)
    # the probe, then RECAST's lines, then the others (each in the rows' order): RECAST's entries together in the legend
    families = dict(sorted(families.items(), key=lambda item: (item[0] != "probe", not is_recast(item[1][0]["method"]))))
    # tab20 indices: reds, oranges, browns, pinks, olives for RECAST; blues, greens, purples, cyans, greys for the rest
    warm, cool = iter([6, 2, 10, 12, 16, 7, 3, 11, 13, 17] * 3), iter([0, 4, 8, 18, 14, 1, 5, 9, 19, 15] * 3)
    recast_labels = []
    for family, members in families.items():
        members = sorted(members, key=lambda row: row["trainable"])
        xs = [max(row["trainable"], 1) for row in members]
        spreads = [statistics.mean(v["spread"] for v in row["tasks"].values()) for row in members]
        recast = is_recast(members[0]["method"])
        color = "dimgray" if family == "probe" else plt.cm.tab20(next(warm if recast else cool) % 20)
        label = legend_label(family, members)
        axis.errorbar(xs, [row["mean"] for row in members], yerr=spreads, color=color, capsize=3, label=label,
                      marker="o" if recast else "s", markersize=6 if recast else 4, linestyle="-" if recast else "--",
                      linewidth=2.4 if recast else 1.0, alpha=1.0 if recast else 0.75, zorder=3 if recast else 2)
        if recast:
            recast_labels.append(label)
        if family == "probe":
            axis.axhline(members[0]["mean"], color=color, linewidth=0.8, linestyle=":")
    axis.set_xscale("log")
    axis.set_xlabel("trainable numbers per task (head excluded; probe plotted at 1)")
    axis.set_ylabel("mean test accuracy over tasks (%)")
    axis.set_title("Accuracy against trainable numbers, all-MiniLM-L6-v2 (RECAST: thick lines, bold)")
    axis.grid(True, which="both", alpha=0.3)
    if families:  # a costs-only run has no rows
        legend = axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for text in legend.get_texts():
            if text.get_text() in recast_labels:
                text.set_fontweight("bold")
        figure.set_size_inches(8.2 + legend.get_window_extent(figure.canvas.get_renderer()).width / figure.dpi, 5)
    save_figure(figure, path)


def learning_rate_curves(settings: BenchSettings, results: Results) -> dict[str, dict[float, float]]:
    """Per method: mean validation accuracy (%) over the tasks at each swept rate (first seed)."""
    protocol = settings.protocol()
    curves = {}
    for name in settings.methods:
        method = METHODS[name]
        points = {}
        for lr in rates_run(method, results, settings.seeds[0]):
            records = [results.runs.get(run_key(name, task, lr, settings.seeds[0], protocol)) for task in settings.tasks]
            if all(records):
                points[lr] = statistics.mean(100 * r["validation_accuracy"] for r in records)
        if len(points) > 1:
            curves[name] = points
    return curves


def plot_learning_rates(curves: dict[str, dict[float, float]], path: str) -> None:
    """Validation accuracy against the adapter's peak AdamW learning rate (log scale), one line per method."""
    import matplotlib.pyplot as plt

    figure, axis = new_figure()
    for index, (name, points) in enumerate(curves.items()):
        rates = sorted(points)
        axis.plot(rates, [points[lr] for lr in rates], marker="o", label=name, color=plt.cm.tab20(index % 20),
                  linestyle="-" if is_recast(name) else "--")
    axis.set_xscale("log")
    axis.set_xlabel("peak AdamW learning rate of the adapter (head: fixed)")
    axis.set_ylabel("mean validation accuracy over tasks (%)")
    axis.set_title("Learning-rate sensitivity, all-MiniLM-L6-v2 (seed 0)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    save_figure(figure, path)


def gain_over_probe(settings: BenchSettings, results: Results, name: str) -> dict[str, dict[float, float]]:
    """Per task, per rate of ``name`` (:func:`~.results.rates_run`): its mean test accuracy over the seeds that ran
    there minus the linear probe's (mean over the same seeds), in points; tasks or rates without runs are left out."""
    protocol = settings.protocol()

    def test_accuracies(method: str, task: str, lr: float) -> dict[int, float]:
        records = {seed: results.runs.get(run_key(method, task, lr, seed, protocol)) for seed in settings.seeds}
        return {seed: 100 * r["test_accuracy"] for seed, r in records.items() if r is not None}

    gains = {}
    for task in settings.tasks:
        probe, points = test_accuracies("probe", task, 0.0), {}
        for lr in rates_run(METHODS[name], results, settings.seeds[0]):
            method = test_accuracies(name, task, lr)
            seeds = [seed for seed in method if seed in probe]
            if seeds:
                points[lr] = statistics.mean(method[seed] - probe[seed] for seed in seeds)
        if points:
            gains[task] = points
    return gains


def format_gains_by_rate(bands: dict[str, dict[str, dict[float, float]]]) -> str:
    """:func:`gain_over_probe` of each method as a Markdown table: a row per method and task, a column per rate."""
    rates = sorted({lr for gains in bands.values() for points in gains.values() for lr in points})
    lines = ["| method | task | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "|---|---|" + "---|" * len(rates)]
    for name, gains in bands.items():
        for task, points in gains.items():
            cells = [f"{points[lr]:+.2f}" if lr in points else "" for lr in rates]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_gain_bands(bands: dict[str, dict[str, dict[float, float]]], path: str) -> None:
    """One panel per method: every task's test accuracy minus the probe's against the adapter's learning rate
    (thin lines; held-out tasks dashed with crosses), the band from the worst to the best tuning task shaded, their
    mean in bold (tuning tasks run at that rate)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(bands), 3)
    rows = -(-len(bands) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False, sharey=True)
    for axis, (name, gains) in zip(axes.flat, bands.items()):
        rates = sorted({lr for points in gains.values() for lr in points})
        for task, points in gains.items():
            xs = sorted(points)
            held = task in HELD_OUT_TASKS
            axis.plot(xs, [points[x] for x in xs], color="grey", linewidth=0.8, linestyle="--" if held else "-",
                      marker="x" if held else None)
        tuning = [points for task, points in gains.items() if task not in HELD_OUT_TASKS]
        complete = [lr for lr in rates if sum(lr in points for points in tuning) > 1]
        if complete:
            low = [min(points[lr] for points in tuning if lr in points) for lr in complete]
            high = [max(points[lr] for points in tuning if lr in points) for lr in complete]
            mean = [statistics.mean(points[lr] for points in tuning if lr in points) for lr in complete]
            axis.fill_between(complete, low, high, color="C3", alpha=0.2, label="worst to best tuning task")
            axis.plot(complete, mean, color="C3", linewidth=2, marker="o", label="mean of the tuning tasks")
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(short_label(METHODS[name].label) + f" ({name})", fontsize=9)
        axis.set_xlabel("peak learning rate of the adapter")
        axis.grid(True, which="both", alpha=0.3)
    for axis in axes.flat[len(bands):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("test accuracy - probe (points)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    save_figure(figure, path)


def changed_predictions(chains: dict) -> list[str]:
    """``"<method>/seed<s>:<task>"`` for every task whose predictions changed after later tasks or a reload."""
    return [f"{key}:{task}" for key, report in chains.items() for task, r in report.items()
            if not (r["predictions_unchanged"] and r["reloaded_predictions_unchanged"])]
