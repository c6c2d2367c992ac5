#!/usr/bin/env python
"""Plot training loss / CE and per-domain validation log-ppl of one or more runs into one PNG.

  python tools/plot_logs.py runs/468M_ce runs/468M_mile --output compare.png
  python tools/plot_logs.py runs/a/metrics.jsonl runs/b/metrics.jsonl --labels CE MiLe --x iteration

Each run is a directory holding metrics.jsonl (the trainer's --metrics-file default) or the
file itself; it is labelled by its directory name unless --labels is given. The first row
shows the training objective, plain CE (comparable across losses) and overall / domain-mean
/ worst-domain validation log-ppl; then one panel per domain. A resumed run that re-logged
iterations keeps the last record of each iteration.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mile.curves import LogError, default_label, metrics_path, plot, read_run  # noqa: E402

__all__ = ["LogError", "default_label", "main", "read_run"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl) or metrics files")
    p.add_argument("--labels", nargs="+", help="one label per run (default: the run's directory name)")
    p.add_argument("--output", "-o", help="PNG path (default: curves.png in the first run's directory)")
    p.add_argument("--x", choices=["tokens", "iteration"], default="tokens",
                   help="x axis; tokens compares runs with different batch sizes")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [default_label(r) for r in args.runs]
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(metrics_path(args.runs[0]))), "curves.png")
    try:
        runs = [read_run(run, label) for run, label in zip(args.runs, labels)]
        out_dir = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(out_dir):
            raise LogError(f"--output: directory {out_dir} does not exist")
        plot(runs, output, "consumed_tokens" if args.x == "tokens" else "iteration")
    except (LogError, OSError) as err:
        print(f"plot_logs: error: {err}", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
