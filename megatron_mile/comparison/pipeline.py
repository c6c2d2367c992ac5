"""A comparison from data to table: train every loss × seed, evaluate each run, aggregate, draw.

Steps, each skipped when it already ran with the same inputs (``steps.Steps``):

1. ``task``: the held-out multiple-choice task (``heldout_task``), unless lm-eval tasks are named;
2. ``train <run>``: the trainer under torchrun (``runs``), resumed from its checkpoint if cut short;
3. ``convert <run>``: the checkpoint to Hugging Face (``megatron-mile-eval``'s conversion cache);
4. ``lm-eval <run>``: lm-eval on the task (``megatron-mile-eval``'s ``evaluate_downstream``);
5. ``buckets <run>``: perplexity and entropy per frequency bucket (``megatron-mile-buckets``);
6. ``unigram``: the unigram model's validation CE, from the same training counts.

Then, always (it takes seconds): ``results/<run>.json`` per run, ``comparison.md`` and
``comparison.json`` (mean ± sample std over seeds, MiLe − CE), ``compare.png``, ``lm_eval.png``
(lm-eval's bar chart) and ``buckets/`` (the frequency tool's side-by-side report).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from megatron_mile.comparison import runs as grid
from megatron_mile.comparison.aggregate import COMPARED, RunResult, by_loss, difference
from megatron_mile.comparison.heldout_task import TASK, TaskSettings
from megatron_mile.comparison.report import markdown_table
from megatron_mile.comparison.steps import Steps, write_json, write_text
from megatron_mile.evaluation.bucket_analysis import DEFAULT_MAX_TOKENS


LOSSES = ("ce", "focal", "mile")


def trainer_default(name: str):
    """A trainer flag's default (its argparse default is the one place it is set)."""
    from megatron_mile.arguments import build_parser

    return build_parser().get_default(name)


@dataclass(frozen=True)
class ComparisonConfig:
    output_dir: str
    data_path: list[str]
    tokenizer_model: str
    trainer_args: list[str]  # shared by every run: model, batch, budget, schedule, evaluation
    losses: list[str] = field(default_factory=lambda: list(LOSSES))
    seeds: list[int] = field(default_factory=lambda: [trainer_default("seed")])
    gamma: float = field(default_factory=lambda: trainer_default("mile_gamma"))
    layouts: dict[str, str] = field(default_factory=dict)  # loss -> layout; default_layout otherwise
    default_layout: str = "dp"
    nproc: int = 1
    tasks: Optional[str] = None  # lm-eval tasks/presets; None: the held-out next-line task
    task_items_per_domain: int = 50
    task_choices: int = 4
    eval_limit: Optional[float] = None
    eval_batch_size: int = 32
    device: Optional[str] = None
    buckets_max_tokens: int = DEFAULT_MAX_TOKENS
    python: str = sys.executable


@dataclass(frozen=True)
class _Run:
    spec: grid.RunSpec
    directory: str
    argv: list[str]


def _files_key(paths: Sequence[str]) -> dict[str, list[int]]:
    """Size and modification time of every file a step reads, so new data makes it run again."""
    return {os.path.abspath(p): [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}


def _data_files(data_path: Sequence[str], tokenizer_model: str) -> list[str]:
    from megatron_mile.data import load_blend

    blend = load_blend(data_path)
    prefixes = dict.fromkeys(blend.train_prefixes + blend.eval_prefixes + list(blend.domains.values()))
    files = [p + suffix for p in prefixes for suffix in (".bin", ".idx")]
    return files + [p for p in data_path if os.path.isfile(p)] + \
        ([tokenizer_model] if os.path.isfile(tokenizer_model) else [])


def plan_runs(config: ComparisonConfig):
    """Every run's trainer arguments, checked before any work; returns (runs, the parsed trainer args)."""
    if not config.losses or not config.seeds:
        raise grid.ComparisonError("--losses and --seeds need at least one value each")
    for name in ("losses", "seeds"):
        values = getattr(config, name)
        if len(set(values)) != len(values):
            raise grid.ComparisonError(f"--{name}: repeated values in {' '.join(map(str, values))}")
    for loss, layout in {**config.layouts, "": config.default_layout}.items():
        if layout not in grid.LAYOUTS:
            raise grid.ComparisonError(f"--layout {loss + '=' if loss else ''}{layout}: expected one of "
                                       f"{', '.join(grid.LAYOUTS)}")
    unknown = sorted(set(config.layouts) - set(config.losses))
    if unknown:
        raise grid.ComparisonError(f"--layout: {', '.join(unknown)} is not among --losses")
    grid.check_shared_flags(config.trainer_args)
    from megatron_mile.data import load_blend

    try:
        load_blend(config.data_path)
    except ValueError as err:
        raise grid.ComparisonError(str(err)) from None
    planned, args = [], None
    for loss in config.losses:
        for seed in config.seeds:
            spec = grid.RunSpec(loss, seed, config.layouts.get(loss, config.default_layout))
            # As given (relative stays relative), so that a moved checkout still recognises its runs.
            directory = os.path.join(config.output_dir, "runs", spec.label)
            argv = grid.trainer_argv(spec, directory, config.data_path, config.tokenizer_model, config.gamma,
                                     config.nproc, config.trainer_args)
            args = grid.check_trainer_argv(argv, config.nproc)
            grid.check_existing(directory, argv)
            planned.append(_Run(spec, directory, argv))
    from megatron_mile.evaluation.frequency import split_bounds

    if split_bounds(args.split, 1) is None:
        raise grid.ComparisonError(f"trainer arguments: --split {args.split} holds no validation data; the "
                                   "comparison evaluates on it")
    return planned, args


def _task_metrics(scores: dict) -> dict[str, float]:
    """lm-eval's ``{task: {metric: value}}`` as flat ``task/<task> <metric>`` entries (None dropped)."""
    return {f"task/{task} {metric}": value for task, metrics in scores.items() for metric, value in metrics.items()
            if value is not None}


def run_metrics(run_dir: str, label: str, train_iters: int, scores: dict, buckets: dict) -> dict[str, float]:
    """One run's numbers (the keys ``report`` describes)."""
    from megatron_mile import curves

    log = curves.read_run(run_dir, label)
    last_eval = log.eval[-1] if log.eval else {}
    if last_eval.get("iteration") != train_iters:
        raise grid.ComparisonError(f"{run_dir}/metrics.jsonl: no evaluation at iteration {train_iters}")
    metrics = {"train_ce": log.train[-1]["ce"], "valid_logppl": last_eval["eval_loss"]}
    metrics.update({f"valid_logppl/{d}": v for d, v in sorted(last_eval["domains"].items())})
    ours = buckets["runs"][label]
    for bucket in buckets["buckets"]:
        if ours[bucket]["tokens"]:
            metrics[f"bucket_ppl/{bucket}"] = ours[bucket]["ppl"]
            metrics[f"bucket_entropy/{bucket}"] = ours[bucket]["entropy"]
    metrics.update(_task_metrics(scores))
    return metrics


def caption(config: ComparisonConfig, args, task: Optional[dict]) -> str:
    seeds = config.seeds
    spread = (f"{len(seeds)} seeds per loss ({', '.join(map(str, seeds))}); ± is the sample standard deviation "
              "(ddof=1) over seeds; MiLe − CE is taken per seed" if len(seeds) > 1 else
              f"one seed ({seeds[0]}); ± is lm-eval's standard error")
    tokens = args.train_iters * args.global_batch_size * _seq_length(args)
    gamma = f", gamma {config.gamma}" if {"focal", "mile"} & set(config.losses) else ""
    line = f"`{args.model_preset}` models, {args.train_iters} iterations ({tokens:,} tokens) per run{gamma}; {spread}."
    if task is not None:
        line += (f" Task: {task['items']} held-out next-line items, {task['choices']} choices "
                 f"(chance accuracy {task['chance_accuracy']:.3g}).")
    return line


def _seq_length(args) -> int:
    from megatron_mile.arguments import model_shape

    return model_shape(args).seq_length


class _Comparison:
    """One comparison's state while it runs: its runs, trainer arguments, steps and inputs."""

    def __init__(self, config: ComparisonConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.out = os.path.abspath(config.output_dir)
        self.planned, self.args = plan_runs(config)
        self.task_settings = TaskSettings(split=self.args.split, seq_length=_seq_length(self.args),
                                          items_per_domain=config.task_items_per_domain,
                                          choices=config.task_choices, seed=config.seeds[0])
        self.task_settings.check()
        self.steps = Steps(self.out, log)
        self.log = log
        self.data = _files_key(_data_files(config.data_path, config.tokenizer_model))

    def task(self) -> tuple[str, Optional[str], Optional[dict], Optional[dict]]:
        """(lm-eval tasks, include path, task description, task key): the held-out task unless tasks are named."""
        config = self.config
        if config.tasks is not None:
            return config.tasks, None, None, None
        from megatron_mile.comparison.heldout_task import write_task

        settings = self.task_settings
        include_path = os.path.join(self.out, "task")
        key = {"settings": asdict(settings), "data": self.data}
        info = self.steps.run("task", key, lambda: write_task(include_path, config.data_path, config.tokenizer_model,
                                                              settings),
                              what=f"held-out next-line task -> {include_path}")
        return TASK, include_path, info, key

    def train(self) -> None:
        config, train_iters = self.config, self.args.train_iters
        for i, run in enumerate(self.planned, start=1):
            self.steps.run(
                f"train {run.spec.label}", {"argv": run.argv},
                lambda: grid.train(run.spec, run.directory, run.argv, config.nproc, train_iters, self.log,
                                   config.python),
                what=f"run {i}/{len(self.planned)}: --loss {run.spec.loss} --seed {run.spec.seed}, layout "
                     f"{run.spec.layout} on {config.nproc} process(es) -> {run.directory}",
                still_valid=lambda result: grid.finished_iteration(run.directory) == train_iters
                and grid.checkpoint_key(run.directory) == result)

    def evaluate(self, tasks: str, include_path: Optional[str], task_key: Optional[dict]) -> tuple[dict, dict]:
        """lm-eval scores and bucket analyses per run label, converting each checkpoint first."""
        from megatron_mile.evaluation import conversion_cache
        from megatron_mile.evaluation.downstream import HarnessOptions, evaluate_downstream
        from megatron_mile.evaluation.sources import resolve_source

        config = self.config
        options = HarnessOptions(num_fewshot=0, limit=config.eval_limit, batch_size=config.eval_batch_size,
                                 device=config.device, include_path=include_path)
        scores, buckets = {}, {}
        for run in self.planned:
            label, checkpoint = run.spec.label, grid.checkpoint_key(run.directory)
            source = resolve_source(run.directory, label)
            self.steps.run(f"convert {label}", checkpoint,
                           lambda: {"hf_directory": conversion_cache.hf_directory(source, log=self.log)},
                           what=f"{source.checkpoint} to Hugging Face",
                           still_valid=lambda result: not conversion_cache.needs_conversion(source))
            scores[label] = self.steps.run(
                f"lm-eval {label}", {"checkpoint": checkpoint, "tasks": tasks, "task": task_key,
                                     "options": asdict(options)},
                lambda: evaluate_downstream([run.directory], tasks, os.path.join(self.out, "lm_eval", label),
                                            labels=[label], options=options, offline=include_path is not None,
                                            log=self.log)["runs"][label],
                what=f"lm-eval {tasks}, zero-shot")
            buckets[label] = self.steps.run(
                f"buckets {label}", {"checkpoint": checkpoint, "max_tokens": config.buckets_max_tokens,
                                     "data": self.data},
                lambda: _bucket_analysis(run.directory, label, config, self.out),
                what="perplexity and entropy per frequency bucket on the validation sets")
        return scores, buckets

    def unigram(self) -> dict[str, float]:
        from megatron_mile.comparison.unigram import validation_cross_entropy

        config, split = self.config, self.args.split
        return self.steps.run("unigram", {"data": self.data, "split": split},
                              lambda: validation_cross_entropy(config.data_path, config.tokenizer_model, split),
                              what="the unigram model's validation CE, from the training counts")

    def summarize(self, scores: dict, buckets: dict, unigram: dict, task: Optional[dict]) -> dict:
        """Results per run, the table, comparison.json and the pictures (always redone: seconds)."""
        from megatron_mile.comparison.figures import plot_comparison
        from megatron_mile.evaluation import bucket_report
        from megatron_mile.evaluation.report import bar_chart

        config, out = self.config, self.out
        results = []
        for run in self.planned:
            label = run.spec.label
            metrics = run_metrics(run.directory, label, self.args.train_iters, scores[label], buckets[label])
            write_json(os.path.join(out, "results", f"{label}.json"),
                       {"label": label, "loss": run.spec.loss, "seed": run.spec.seed, "layout": run.spec.layout,
                        "run": run.directory, "metrics": metrics})
            results.append(RunResult(label, run.spec.loss, run.spec.seed, metrics))
        table = caption(config, self.args, task) + "\n\n" + markdown_table(results, config.losses, unigram)
        write_text(os.path.join(out, "comparison.md"), table)
        compared = set(COMPARED) <= set(config.losses)
        summary = {
            "losses": config.losses, "seeds": config.seeds, "std": "sample standard deviation over seeds (ddof=1)",
            "unigram": unigram, "task": task,
            "by_loss": {m: {loss: asdict(s) for loss, s in row.items()}
                        for m, row in by_loss(results, config.losses).items()},
            "mile_minus_ce": ({m: asdict(s) for m, s in difference(results, *COMPARED).items()}
                              if compared else None),
            "runs": {r.label: r.metrics for r in results},
        }
        write_json(os.path.join(out, "comparison.json"), summary)
        plot_comparison(results, {run.spec.label: run.directory for run in self.planned}, config.losses, unigram,
                        os.path.join(out, "compare.png"))
        bar_chart(scores, os.path.join(out, "lm_eval.png.tmp"))
        os.replace(os.path.join(out, "lm_eval.png.tmp"), os.path.join(out, "lm_eval.png"))
        merged = {"buckets": next(iter(buckets.values()))["buckets"],
                  "runs": {label: result["runs"][label] for label, result in buckets.items()}}
        bucket_report.write_reports(merged, os.path.join(out, "buckets"))
        self.log("\n" + table)
        return summary


def run_comparison(config: ComparisonConfig, log: Callable[[str], None] = print) -> dict:
    """Everything in the module docstring; returns the contents of ``comparison.json``."""
    start = time.monotonic()
    comparison = _Comparison(config, log)
    tasks, include_path, task, task_key = comparison.task()
    comparison.train()
    scores, buckets = comparison.evaluate(tasks, include_path, task_key)
    summary = comparison.summarize(scores, buckets, comparison.unigram(), task)
    log(f"steps:\n{comparison.steps.summary()}")
    log(f"comparison finished in {time.monotonic() - start:.1f} s: {comparison.out}/comparison.md, compare.png, "
        "lm_eval.png, buckets/buckets.md, results/")
    return summary


def _bucket_analysis(run_dir: str, label: str, config: ComparisonConfig, out: str) -> dict:
    from megatron_mile.evaluation.bucket_analysis import analyze_buckets

    return analyze_buckets([run_dir], config.data_path, config.tokenizer_model, labels=[label],
                           max_tokens=config.buckets_max_tokens,
                           data_cache_path=os.path.join(out, "buckets", "data_cache"))
