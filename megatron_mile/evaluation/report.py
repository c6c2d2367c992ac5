"""One comparison of several models' benchmark scores: a table (Markdown, CSV) and a bar chart.

Input is ``{label: {task: {metric: value, metric + "_stderr": stderr}}}``. Each task is shown
with one headline metric, the first of ``HEADLINE_METRICS`` it reports (length-normalised
accuracy where lm-eval computes it, as usual for HellaSwag, ARC, OpenBookQA and PIQA), and
the tasks' average closes the table: the mean of the headline values, with stderr
``sqrt(sum stderr^2) / n`` (tasks are independent samples). A model without a task shows "-".
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Optional

from megatron_mile.evaluation.harness import STDERR

HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "f1", "em", "mcc", "word_perplexity", "perplexity")
AVERAGE = "average"
RESULTS_JSON = "results.json"
OUTPUT_FILES = ("results.md", "results.csv", "results.png", RESULTS_JSON)

Scores = dict[str, dict[str, dict[str, Optional[float]]]]  # label -> task -> metric -> value


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    cells: dict[str, tuple[Optional[float], Optional[float]]]  # label -> (value, stderr)


def headline_metric(metrics: dict[str, Optional[float]]) -> Optional[str]:
    for name in HEADLINE_METRICS:
        if name in metrics:
            return name
    return next((name for name in metrics if not name.endswith(STDERR)), None)


def comparison_rows(runs: Scores) -> list[Row]:
    """One row per task (in first-seen order) and the average row."""
    tasks: dict[str, str] = {}
    for scores in runs.values():
        for task, metrics in scores.items():
            metric = headline_metric(metrics)
            if task not in tasks and metric is not None:
                tasks[task] = metric
    rows = [Row(task, metric, {label: (scores.get(task, {}).get(metric), scores.get(task, {}).get(metric + STDERR))
                               for label, scores in runs.items()})
            for task, metric in tasks.items()]
    average = {}
    for label in runs:
        cells = [row.cells[label] for row in rows]
        values = [value for value, _ in cells]
        errors = [err for _, err in cells]
        mean = sum(values) / len(values) if values and None not in values else None
        stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if errors and None not in errors else None
        average[label] = (mean, stderr if mean is not None else None)
    return rows + [Row(AVERAGE, "mean", average)]


def _cell(value: Optional[float], stderr: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def markdown_table(runs: Scores) -> str:
    labels = list(runs)
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for row in comparison_rows(runs):
        task = f"**{row.task}**" if row.task == AVERAGE else row.task
        lines.append(f"| {task} | {row.metric} | " + " | ".join(_cell(*row.cells[label]) for label in labels) + " |")
    return "\n".join(lines) + "\n"


def csv_table(runs: Scores) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "metric"] + [name for label in runs for name in (label, label + STDERR)])
    for row in comparison_rows(runs):
        writer.writerow([row.task, row.metric] + ["" if x is None else repr(x)
                                                  for label in runs for x in row.cells[label]])
    return out.getvalue()


def bar_chart(runs: Scores, path: str) -> None:
    """Grouped bars: one group per task and the average, one bar per model, stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_rows(runs)
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(runs)) ** 0.5 + 2), 4.5))
    for i, label in enumerate(runs):
        values = [row.cells[label][0] for row in rows]
        errors = [row.cells[label][1] for row in rows]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [math.nan if v is None else v for v in values], width, label=label,
               yerr=[0.0 if e is None else e for e in errors], capsize=2)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{row.task}\n({row.metric})" for row in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_tables(runs: Scores, output_dir: str) -> None:
    """``results.md``, ``results.csv`` and ``results.png`` in ``output_dir``."""
    write_atomic(os.path.join(output_dir, "results.md"), markdown_table(runs))
    write_atomic(os.path.join(output_dir, "results.csv"), csv_table(runs))
    png = os.path.join(output_dir, "results.png")
    bar_chart(runs, png + ".tmp")
    os.replace(png + ".tmp", png)
