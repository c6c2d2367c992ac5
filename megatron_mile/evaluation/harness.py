"""lm-evaluation-harness on Hugging Face model directories: task names, presets, one model's scores.

Models run through lm-eval's Python API (``lm_eval.simple_evaluate``, the ``hf`` backend),
loaded from a local directory. Task names are lm-eval's; a preset names the paper's setting.
The task index (thousands of YAML files, seconds to build) is built once per command and
shared by all models; when ``include_path`` alone defines every requested task, only that
directory is indexed.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

COMMONSENSE = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "social_iqa")
CLOSED_BOOK_QA = ("triviaqa", "webqs")
# The paper's downstream suite: common-sense reasoning and closed-book QA (siqa is lm-eval's social_iqa).
PRESETS = {"paper": COMMONSENSE + CLOSED_BOOK_QA, "commonsense": COMMONSENSE, "closed-book-qa": CLOSED_BOOK_QA}
DTYPES = ("auto", "float32", "bfloat16", "float16")
STDERR = "_stderr"


class TaskError(ValueError):
    """Task names or a task directory that lm-eval does not know: one line per problem."""


@dataclass(frozen=True)
class HarnessOptions:
    """lm-eval settings shared by every model of one command (defaults are the CLI's)."""

    num_fewshot: Optional[int] = None  # None: each task's own default (0 for the paper's tasks)
    limit: Optional[float] = None  # examples per task; below 1, a fraction (testing only)
    batch_size: Union[int, str] = 8  # or "auto" / "auto:N" (lm-eval finds the largest that fits)
    device: Optional[str] = None  # None: "cuda" when a GPU is visible, else "cpu"
    dtype: str = "auto"  # as saved in config.json: bfloat16 for --bf16 runs
    include_path: Optional[str] = None  # a directory of local task YAMLs


def expand_tasks(spec: Union[str, Sequence[str]]) -> list[str]:
    """``"hellaswag,piqa"``, a preset name, or a mix, to task names in order without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        for name in PRESETS.get(item, (item,) if item else ()):
            if name not in names:
                names.append(name)
    if not names:
        raise TaskError("--tasks: no task given")
    return names


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and os.path.isfile(name)


def build_task_manager(names: Sequence[str], include_path: Optional[str] = None):
    """An lm-eval ``TaskManager`` that knows every name; ``TaskError`` lists the unknown ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not os.path.isdir(include_path):
            raise TaskError(f"--include-path: {include_path} is not a directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_subtasks or _is_task_file(name) for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    problems = []
    for name in names:
        if name not in known and not _is_task_file(name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; close: {', '.join(close)}" if close else "; `lm-eval ls tasks` lists them"
            problems.append(f"--tasks: unknown task {name!r}{hint}")
    if problems:
        raise TaskError("\n".join(problems))
    return manager


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_model(model_dir: str, names: Sequence[str], manager, options: HarnessOptions) -> dict:
    """lm-eval's full results for one HF directory (``simple_evaluate``'s dict, no samples)."""
    from lm_eval import simple_evaluate

    limit = options.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    # An absolute path: lm-eval asks the hub for the "model sha" of anything shaped like a repo id.
    model_args = {"pretrained": os.path.abspath(model_dir), "dtype": options.dtype}
    return simple_evaluate(
        model="hf", model_args=model_args, tasks=list(names),
        num_fewshot=options.num_fewshot, batch_size=options.batch_size, device=options.device or default_device(),
        limit=limit, task_manager=manager, log_samples=False)


def results_json(results: dict) -> str:
    """lm-eval's results as its own CLI writes them (numpy values and the like made serialisable)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def task_scores(results: dict) -> dict[str, dict[str, Optional[float]]]:
    """``{task: {metric: value, metric + "_stderr": stderr}}`` from lm-eval's results.

    lm-eval keys metrics as ``"metric,filter"``; the filter is dropped where a task has only
    one (``"none"`` for log-likelihood tasks), and kept (``"metric,filter"``) otherwise.
    A stderr lm-eval could not compute ("N/A") is ``None``.
    """
    scores = {}
    for task, entry in results["results"].items():
        keys = [k for k in entry if "," in k]
        filters = {k.split(",", 1)[1] for k in keys}
        metrics: dict[str, Optional[float]] = {}
        for key in keys:
            metric, filter_name = key.split(",", 1)
            base = metric.removesuffix(STDERR)
            name = (base if len(filters) == 1 else f"{base},{filter_name}") + (STDERR if metric != base else "")
            value = entry[key]
            metrics[name] = float(value) if isinstance(value, (int, float)) else None
        scores[task] = metrics
    return scores
