"""Per-run numbers to one comparison: mean ± standard deviation over seeds, and MiLe − CE.

Each run contributes a flat ``{metric: value}`` dict (``metric + "_stderr"`` where lm-eval gives
one). Per loss and metric: the mean over seeds and the *sample* standard deviation (ddof=1,
undefined for one seed). The difference of two losses is taken per seed (the runs of one seed
share the initialisation and the data order) and summarised the same way: mean and sample std
of ``value(loss) - value(reference)`` over the seeds both ran. A mean difference whose size is
not above that std is "within the seed spread".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

STDERR = "_stderr"
COMPARED = ("mile", "ce")  # the difference every comparison reports: MiLe − CE


@dataclass(frozen=True)
class Summary:
    mean: float
    std: Optional[float]  # sample std (ddof=1); None for one value
    n: int
    stderr: Optional[float] = None  # one run: its own stderr (lm-eval's), where it has one

    @property
    def within_spread(self) -> Optional[bool]:
        """For a difference: is its mean no larger than its spread? (None: no spread with one seed)."""
        return None if self.std is None else abs(self.mean) <= self.std


def summarize(values: Sequence[float], stderr: Optional[float] = None) -> Summary:
    """Mean and sample standard deviation (ddof=1) of ``values``."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(mean, std, n, stderr if n == 1 else None)


@dataclass(frozen=True)
class RunResult:
    label: str
    loss: str
    seed: int
    metrics: dict[str, float]


def metric_names(runs: Sequence[RunResult]) -> list[str]:
    """Every metric any run reports (stderr entries aside), in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        names.update((k, None) for k in run.metrics if not k.endswith(STDERR))
    return list(names)


def by_loss(runs: Sequence[RunResult], losses: Sequence[str]) -> dict[str, dict[str, Summary]]:
    """``{metric: {loss: Summary over that loss's seeds}}`` (losses without the metric left out)."""
    table: dict[str, dict[str, Summary]] = {}
    for metric in metric_names(runs):
        row = {}
        for loss in losses:
            found = [r for r in runs if r.loss == loss and metric in r.metrics]
            if found:
                row[loss] = summarize([r.metrics[metric] for r in found], found[0].metrics.get(metric + STDERR))
        table[metric] = row
    return table


def difference(runs: Sequence[RunResult], loss: str, reference: str) -> dict[str, Summary]:
    """``{metric: Summary of value(loss) - value(reference)}`` over the seeds both ran, paired by seed."""
    out = {}
    for metric in metric_names(runs):
        ours = {r.seed: r.metrics[metric] for r in runs if r.loss == loss and metric in r.metrics}
        theirs = {r.seed: r.metrics[metric] for r in runs if r.loss == reference and metric in r.metrics}
        seeds = sorted(set(ours) & set(theirs))
        if seeds:
            out[metric] = summarize([ours[s] - theirs[s] for s in seeds])
    return out
