"""The comparison table: one row per metric, one column per loss, in Markdown (pastes into a README).

Metric names (the keys of every run's results file):

- ``train_ce``: training cross-entropy over the last logging window (comparable across losses);
- ``valid_logppl`` and ``valid_logppl/<domain>``: the trainer's last evaluation (mean CE);
- ``bucket_ppl/<bucket>``, ``bucket_entropy/<bucket>``: the frequency-bucket analysis;
- ``task/<task> <metric>`` (and ``_stderr``): lm-eval on the comparison's task(s).

A cell is ``mean ± sample std`` over seeds, or with one seed the value (``± stderr`` where lm-eval
gives one). The optional ``unigram`` column is the reference the models must beat, and the
difference column holds MiLe − CE per seed, summarised the same way.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_mile.comparison.aggregate import COMPARED, RunResult, Summary, by_loss, difference

LOSS_NAMES = {"ce": "CE", "focal": "focal", "mile": "MiLe"}
BUCKET_NAMES = {"high": "high-frequency", "medium": "medium-frequency", "low": "low-frequency", "unseen": "unseen"}


def metric_label(metric: str) -> str:
    kind, _, part = metric.partition("/")
    if kind == "train_ce":
        return "final training CE"
    if kind == "valid_logppl":
        return f"validation log-ppl, {part}" if part else "validation log-ppl"
    if kind == "bucket_ppl":
        return f"ppl, {BUCKET_NAMES.get(part, part)} tokens"
    if kind == "bucket_entropy":
        return f"mean entropy, {BUCKET_NAMES.get(part, part)} tokens"
    if kind == "task":
        return f"task {part}"
    return metric


def number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def cell(summary: Optional[Summary]) -> str:
    if summary is None:
        return "-"
    spread = summary.std if summary.std is not None else summary.stderr
    return number(summary.mean) + (f" ± {number(spread)}" if spread is not None else "")


def difference_cell(summary: Optional[Summary]) -> str:
    if summary is None:
        return "-"
    if summary.std is None:
        return f"{number(summary.mean)} (one seed)"
    return cell(summary) + (" (within seed spread)" if summary.within_spread else "")


def markdown_table(runs: Sequence[RunResult], losses: Sequence[str], unigram: Optional[dict[str, float]] = None
                   ) -> str:
    """The table; ``unigram`` maps validation metrics to the unigram model's value."""
    table = by_loss(runs, losses)
    loss, reference = COMPARED
    diff = difference(runs, loss, reference) if loss in losses and reference in losses else None
    header = ["metric", *(LOSS_NAMES.get(name, name) for name in losses)]
    if unigram:
        header.append("unigram")
    if diff is not None:
        header.append(f"{LOSS_NAMES.get(loss, loss)} − {LOSS_NAMES.get(reference, reference)}")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for metric, row in table.items():
        cells = [metric_label(metric), *(cell(row.get(name)) for name in losses)]
        if unigram:
            cells.append(number(unigram[metric]) if metric in unigram else "")
        if diff is not None:
            cells.append(difference_cell(diff.get(metric)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
