"""``buckets.json``, ``buckets.md`` and ``buckets.png`` from the analysis' result, each written atomically.

The Markdown has the vocabulary buckets, then one table per validation set (the blend, then every
domain): tokens per bucket, each run's perplexity, the change of every other run against the first
(``(ppl / ppl_first - 1)`` in percent) and each run's mean predicted entropy. The figure shows the
blend's perplexity per bucket and run, and the change against the first run.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from megatron_mile.evaluation.frequency import BUCKETS

ROWS = ("overall", *BUCKETS)


def _number(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _change(value: Optional[float], reference: Optional[float]) -> str:
    if value is None or not reference:
        return "–"
    return f"{100 * (value / reference - 1):+.2f}%"


def _table(per_run: dict[str, dict]) -> list[str]:
    labels = list(per_run)
    first = labels[0]
    header = (["bucket", "tokens"] + [f"ppl {label}" for label in labels]
              + [f"{label} vs {first}" for label in labels[1:]] + [f"entropy {label}" for label in labels])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ROWS:
        cells = [row, f"{per_run[first][row]['tokens']:,}"]
        cells += [_number(per_run[label][row]["ppl"]) for label in labels]
        cells += [_change(per_run[label][row]["ppl"], per_run[first][row]["ppl"]) for label in labels[1:]]
        cells += [_number(per_run[label][row].get("entropy")) if row != "overall" else "" for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict, command: Optional[str] = None) -> str:
    lines = ["# Perplexity by token frequency", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += ["Buckets of the training token frequencies (share: of the training tokens, blend-weighted):", "",
              "| bucket | token ids | share |", "|---|---|---|"]
    lines += [f"| {name} | {b['ids']:,} | {100 * b['share']:.2f}% |" for name, b in result["buckets"].items()]
    runs = result["runs"]
    sets = {"Validation blend": {label: run for label, run in runs.items()}}
    domains = next(iter(runs.values()))["domains"]
    sets.update({f"Domain: {d}": {label: run["domains"][d] for label, run in runs.items()} for d in domains})
    for title, per_run in sets.items():
        lines += ["", f"## {title}", ""] + _table(per_run)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = list(runs)
    panels = 2 if len(labels) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    width = 0.8 / len(labels)
    xs = range(len(ROWS))
    ax = axes[0][0]
    for k, label in enumerate(labels):
        values = [runs[label][row]["ppl"] or 0.0 for row in ROWS]
        ax.bar([x + k * width for x in xs], values, width, label=label, color=f"C{k}")
    ax.set(xticks=[x + width * (len(labels) - 1) / 2 for x in xs], xticklabels=ROWS, yscale="log",
           ylabel="perplexity", title="Validation blend: perplexity by target-token bucket")
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        first = runs[labels[0]]
        others = labels[1:]
        width = 0.8 / len(others)
        for k, label in enumerate(others):
            values = [100 * (runs[label][row]["ppl"] / first[row]["ppl"] - 1)
                      if runs[label][row]["ppl"] and first[row]["ppl"] else 0.0 for row in ROWS]
            ax.bar([x + k * width for x in xs], values, width, label=label, color=f"C{k + 1}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set(xticks=[x + width * (len(others) - 1) / 2 for x in xs], xticklabels=ROWS,
               ylabel=f"perplexity vs {labels[0]} (%)", title=f"Change against {labels[0]}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _atomic(path: str, write: Callable[[str], None]) -> None:
    partial = path + ".partial"
    write(partial)
    os.replace(partial, path)


def _write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def write_reports(result: dict, output_dir: str, command: Optional[str] = None) -> dict[str, str]:
    """Write the three files (the JSON last) and return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, f"buckets.{name}") for name in ("md", "png", "json")}
    _atomic(paths["md"], _write_text(markdown(result, command)))
    _atomic(paths["png"], lambda path: plot(result, path))
    _atomic(paths["json"], _write_text(json.dumps(result, indent=2) + "\n"))
    return paths
