"""Training curves of runs: reading ``metrics.jsonl`` files and drawing them.

Each run is a directory holding ``metrics.jsonl`` (the trainer's ``--metrics-file`` default) or the
file itself. A resumed run that re-logged iterations keeps the last record of each iteration.
``plot`` draws the training objective, plain CE (comparable across losses) and overall /
domain-mean / worst-domain validation log-ppl, then one panel per domain (``tools/plot_logs.py``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

TRAIN, EVAL = "train", "eval"


class LogError(ValueError):
    """A missing, empty or malformed metrics file; the message is one line naming file[:line]."""


@dataclass
class Run:
    label: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)


def metrics_path(run: str) -> str:
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


def default_label(run: str) -> str:
    path = os.path.abspath(metrics_path(run))
    if os.path.basename(path) == "metrics.jsonl":
        return os.path.basename(os.path.dirname(path))
    return os.path.splitext(os.path.basename(path))[0]


def read_run(run: str, label: str) -> Run:
    path = metrics_path(run)
    if not os.path.isfile(path):
        raise LogError(f"{path}: no such file")
    records: dict[str, dict[int, dict]] = {TRAIN: {}, EVAL: {}}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LogError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise LogError(f"{path}:{number}: expected a JSON object")
            kind, iteration = record.get("type"), record.get("iteration")
            if kind not in records:
                continue  # other record types are not plotted
            if not isinstance(iteration, int):
                raise LogError(f"{path}:{number}: {kind} record without an integer 'iteration'")
            records[kind][iteration] = record  # a resumed run's later record wins
    if not records[TRAIN] and not records[EVAL]:
        raise LogError(f"{path}: empty (no train or eval records)")
    return Run(label, *(sorted(records[k].values(), key=lambda r: r["iteration"]) for k in (TRAIN, EVAL)))


def series(records: list[dict], x_key: str, key: str, domain: str | None = None) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        value = r.get("domains", {}).get(domain) if domain else r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and x_key in r:
            xs.append(r[x_key])
            ys.append(value)
    return xs, ys


def plot(runs: list[Run], output: str, x_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({d for run in runs for r in run.eval for d in r.get("domains", {})})
    columns = 3
    rows = 1 + math.ceil(len(domains) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x_label = "tokens" if x_key == "consumed_tokens" else "iteration"

    panels = [(axes[0][0], "training objective (loss)", TRAIN, "loss", None),
              (axes[0][1], "training CE", TRAIN, "ce", None)]
    panels += [(axes[1 + i // columns][i % columns], f"{d} log-ppl", EVAL, None, d) for i, d in enumerate(domains)]
    for ax, title, kind, key, domain in panels:
        for i, run in enumerate(runs):
            xs, ys = series(getattr(run, kind), x_key, key, domain)
            ax.plot(xs, ys, color=colors[i % len(colors)], label=run.label, marker="." if kind == EVAL else None)
        ax.set_title(title)

    ax = axes[0][2]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for key, style in (("eval_loss", "-"), ("domain_avg", "--"), ("domain_worst", ":")):
            xs, ys = series(run.eval, x_key, key)
            ax.plot(xs, ys, style, color=color, marker=".", label=f"{run.label} {key}")
    ax.set_title("validation log-ppl (all, domain mean, worst)")

    used = 3 + len(domains)
    for index, ax in enumerate(ax for row in axes for ax in row):
        if index >= used:
            ax.set_visible(False)
            continue
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, output)


def save_png(fig, output: str) -> None:
    """Write ``fig`` beside the target and rename it, so a viewer never sees a half-written PNG; closes it."""
    import matplotlib.pyplot as plt

    tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
