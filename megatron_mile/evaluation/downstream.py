"""Downstream benchmarks for several models as one comparison: the API behind megatron-mile-eval.

    from megatron_mile.evaluation.downstream import HarnessOptions, evaluate_downstream

    summary = evaluate_downstream(["runs/ce", "runs/mile"], "paper", "results/0shot", labels=["ce", "mile"],
                                  options=HarnessOptions(num_fewshot=0, batch_size=32))
    summary["runs"]["mile"]["hellaswag"]["acc_norm"]

Every input is checked before any work (paths, labels, task names, tokenizers), and all
problems are reported together, one line each. Then, per model: its checkpoint is converted
(or the cached conversion reused, see ``conversion_cache``) and lm-eval runs on it. Output in
``output_dir``: ``lm_eval/<label>.json`` (lm-eval's full results, written as each model
finishes), ``results.md``, ``results.csv``, ``results.png`` and, last, ``results.json``.

Checkpoints are converted in a spawned process, so a script that calls this keeps its work
under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from typing import Callable, Optional, Sequence, Union

from megatron_mile.evaluation import conversion_cache, harness, report
from megatron_mile.evaluation.harness import HarnessOptions
from megatron_mile.evaluation.sources import HF, Source, SourceError, default_labels, resolve_source, resolve_sources

__all__ = ["EvalInputError", "HarnessOptions", "evaluate_downstream", "go_offline"]


class EvalInputError(ValueError):
    """Bad input found before any work; ``problems`` has one line per bad input."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def go_offline() -> None:
    """No Hugging Face hub access: models and datasets come from local files and caches only.

    The libraries read these variables when first imported; modules already imported are
    switched as well.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def check_hf_model(path: str) -> None:
    """An HF directory whose tokenizer loads and fits the model's embedding."""
    from transformers import AutoTokenizer

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            vocab_size = json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SourceError(f"{path}/config.json: no vocab_size ({type(err).__name__}: {err})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError, KeyError...
        raise SourceError(f"{path}: no loadable tokenizer ({str(err).splitlines()[0]})") from None
    if len(tokenizer) > vocab_size:
        raise SourceError(f"{path}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                          f"vocab_size {vocab_size} (config.json)")


def prepare(paths: Sequence[str], tasks: Union[str, Sequence[str]], *, labels: Optional[Sequence[str]] = None,
            iteration: Optional[int] = None, cache_dir: Optional[str] = None, include_path: Optional[str] = None):
    """Check every input; returns (sources, task names, lm-eval task manager) or raises ``EvalInputError``."""
    problems: list[str] = []
    sources: list[Source] = []
    try:
        sources = resolve_sources(paths, labels, iteration)
    except SourceError as err:
        problems += str(err).splitlines()
        # Still check the models that resolve, so that every bad input is reported at once.
        for path, label in zip(paths, default_labels(paths)):
            with contextlib.suppress(SourceError):
                sources.append(resolve_source(path, label, iteration))
    names: list[str] = []
    manager = None
    try:
        names = harness.expand_tasks(tasks)
        manager = harness.build_task_manager(names, include_path)
    except harness.TaskError as err:
        problems += str(err).splitlines()
    for source in sources:
        try:
            if source.kind == HF:
                check_hf_model(source.path)
            elif conversion_cache.needs_conversion(source, cache_dir):
                conversion_cache.check_run_tokenizer(source)
        except SourceError as err:
            problems.append(str(err))
    if problems:
        raise EvalInputError(problems)
    return sources, names, manager


def _file_names(labels: Sequence[str]) -> dict[str, str]:
    """A distinct, file-safe name per label for ``lm_eval/<name>.json``."""
    names: dict[str, str] = {}
    for label in labels:
        name = base = re.sub(r"[^A-Za-z0-9._+-]+", "_", label).strip("._") or "model"
        suffix = 1
        while name in names.values():
            suffix += 1
            name = f"{base}_{suffix}"
        names[label] = name
    return names


def evaluate_downstream(paths: Sequence[str], tasks: Union[str, Sequence[str]], output_dir: str, *,
                        labels: Optional[Sequence[str]] = None, iteration: Optional[int] = None,
                        cache_dir: Optional[str] = None, options: HarnessOptions = HarnessOptions(),
                        offline: bool = False, log: Callable[[str], None] = print) -> dict:
    """Evaluate every model on ``tasks`` (names and/or presets, see ``harness.PRESETS``).

    ``paths``: megatron-mile run directories (latest checkpoint, or ``iteration``), single
    ``iter_NNNNNNN`` checkpoints, or Hugging Face model directories, in any mix; ``labels``
    default to their directory names. Returns what ``results.json`` holds:
    ``{"runs": {label: {task: {metric: value, metric + "_stderr": stderr}}}, "models": ...,
    "settings": ...}``. Raises ``EvalInputError`` before any work on bad input.
    """
    if offline:
        go_offline()
    sources, names, manager = prepare(paths, tasks, labels=labels, iteration=iteration, cache_dir=cache_dir,
                                      include_path=options.include_path)
    os.makedirs(os.path.join(output_dir, "lm_eval"), exist_ok=True)
    for name in report.OUTPUT_FILES:  # an earlier command's tables must not pass for this one's
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
    file_names = _file_names([source.label for source in sources])
    runs, models = {}, {}
    for index, source in enumerate(sources, start=1):
        log(f"[{index}/{len(sources)}] {source.label}: {source.path}")
        model_dir = conversion_cache.hf_directory(source, cache_dir, log)
        log(f"[{index}/{len(sources)}] {source.label}: lm-eval {','.join(names)} on {model_dir}")
        results = harness.evaluate_model(model_dir, names, manager, options)
        report.write_atomic(os.path.join(output_dir, "lm_eval", f"{file_names[source.label]}.json"),
                            harness.results_json(results))
        runs[source.label] = harness.task_scores(results)
        models[source.label] = {"path": source.path, "hf_directory": model_dir, "iteration": source.iteration}
    summary = {"runs": runs, "models": models,
               "settings": {"tasks": names, "num_fewshot": options.num_fewshot, "limit": options.limit,
                            "dtype": options.dtype}}
    report.write_tables(runs, output_dir)
    report.write_atomic(os.path.join(output_dir, report.RESULTS_JSON), json.dumps(summary, indent=2))
    log(report.markdown_table(runs))
    return summary
