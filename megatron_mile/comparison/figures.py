"""``compare.png``: the comparison's curves and final numbers in one picture.

Top row: training CE and validation log-ppl against tokens, one line per run (one colour per
loss, whatever the seed; the unigram model's validation CE dashed), and the last evaluation's
log-ppl per domain.
Bottom row: perplexity per frequency bucket, its change relative to CE (per seed, in % of CE's
mean), and the mean predicted entropy per bucket. Bars are means over seeds with the sample std
as error bars (none with one seed).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from megatron_mile import curves
from megatron_mile.comparison.aggregate import RunResult, Summary, by_loss, difference
from megatron_mile.comparison.report import LOSS_NAMES

BUCKETS = ("high", "medium", "low", "unseen")


def _grouped_bars(ax, groups: Sequence[str], series: dict[str, list[Optional[Summary]]], colors: dict[str, str]
                  ) -> float:
    """One group of bars per entry of ``groups``, one bar per series; the std over seeds (if any) as error
    bars. Returns the lowest bar."""
    width = 0.8 / max(len(series), 1)
    lowest = math.inf
    for i, (name, summaries) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        values = [math.nan if s is None else s.mean for s in summaries]
        spread = [s is not None and s.std is not None for s in summaries]
        errors = [s.std if known else 0.0 for s, known in zip(summaries, spread)] if any(spread) else None
        ax.bar(xs, values, width, yerr=errors, capsize=2, color=colors[name], label=LOSS_NAMES.get(name, name))
        lowest = min([lowest, *(v for v in values if math.isfinite(v))])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return lowest


def _zoom(ax, lowest: float) -> None:
    """Start the y axis just below the lowest bar: the differences matter, not the distance from zero."""
    if math.isfinite(lowest) and lowest > 0:
        ax.set_ylim(bottom=0.9 * lowest)


def plot_comparison(runs: Sequence[RunResult], run_dirs: dict[str, str], losses: Sequence[str],
                    unigram: dict[str, float], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {loss: palette[i % len(palette)] for i, loss in enumerate(losses)}
    table = by_loss(runs, losses)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))

    labelled = set()
    for run in runs:
        curve = curves.read_run(run_dirs[run.label], run.label)
        # One legend entry per loss: its seeds share the colour.
        name = "_" if run.loss in labelled else LOSS_NAMES.get(run.loss, run.loss)
        labelled.add(run.loss)
        axes[0][0].plot(*curves.series(curve.train, "consumed_tokens", "ce"), color=colors[run.loss], label=name)
        axes[0][1].plot(*curves.series(curve.eval, "consumed_tokens", "eval_loss"), color=colors[run.loss],
                        marker=".", label=name)
    if "valid_logppl" in unigram:
        axes[0][1].axhline(unigram["valid_logppl"], color="black", linestyle="--", label="unigram model")
    for ax, title in ((axes[0][0], "training CE"), (axes[0][1], "validation log-ppl")):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")

    domains = [m.split("/", 1)[1] for m in table if m.startswith("valid_logppl/")]
    ax = axes[0][2]
    lowest = _grouped_bars(ax, domains, {loss: [table[f"valid_logppl/{d}"].get(loss) for d in domains]
                                         for loss in losses}, colors)
    ax.plot(range(len(domains)), [unigram.get(f"valid_logppl/{d}", math.nan) for d in domains], "kx",
            label="unigram model")
    ax.legend(fontsize="small")
    _zoom(ax, lowest)
    ax.set_title("validation log-ppl per domain (last evaluation)")

    buckets = [b for b in BUCKETS if f"bucket_ppl/{b}" in table]
    ax = axes[1][0]
    _grouped_bars(ax, buckets, {loss: [table[f"bucket_ppl/{b}"].get(loss) for b in buckets] for loss in losses},
                  colors)
    ax.set_yscale("log")
    ax.set_title("perplexity per frequency bucket")

    ax = axes[1][1]
    if "ce" in losses:
        change = {}
        for loss in (name for name in losses if name != "ce"):
            # Per seed, like the table's MiLe − CE, as a percentage of CE's mean.
            paired = difference(runs, loss, "ce")
            change[loss] = []
            for b in buckets:
                diff, ce = paired.get(f"bucket_ppl/{b}"), table[f"bucket_ppl/{b}"].get("ce")
                change[loss].append(None if diff is None or ce is None else Summary(
                    100 * diff.mean / ce.mean, None if diff.std is None else 100 * diff.std / ce.mean, diff.n))
        _grouped_bars(ax, buckets, change, colors)
        ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title("bucket perplexity relative to CE (%)")

    ax = axes[1][2]
    _zoom(ax, _grouped_bars(ax, buckets, {loss: [table.get(f"bucket_entropy/{b}", {}).get(loss) for b in buckets]
                                          for loss in losses}, colors))
    ax.set_title("mean predicted entropy per bucket (nats)")

    fig.tight_layout()
    curves.save_png(fig, output)
