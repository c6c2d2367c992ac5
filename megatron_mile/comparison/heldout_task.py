"""A local lm-eval multiple-choice task from held-out documents: which line comes next?

Each item shows whole lines of a document that training never saw (from the document's start
where they fit in half the sequence length, else the lines just before) and asks for the
document's true next line among ``choices`` candidates: that line and ``choices - 1`` lines
drawn from *other* held-out documents of the same domain. lm-eval picks the candidate of highest
log-likelihood after the context; a guess is right with probability ``1 / choices`` (chance
accuracy), and the true line's position is drawn uniformly.

Held out means the validation and test split of every domain, cut exactly as the trainer cuts it:
megatron-core assigns documents ``[round(lo * N), round(hi * N))`` of each domain's dataset to a
split with bounds ``(lo, hi)`` from ``--split``. A domain whose validation data is a separate
dataset (a blend with its own ``eval`` prefixes) is held out whole. A held-out document whose
tokens equal a training document of the same dataset (a file shipped twice, such as a licence) is
left out, so no item comes from a document the model was trained on (single lines, such as licence
boilerplate, may still recur across documents).

The items are a deterministic function of the data, the tokenizer, ``--split``, the sequence
length and ``seed``. Files (``write_task``): ``DIR/heldout_next_line.yaml`` (the lm-eval task,
used with ``--include-path DIR``), ``DIR/heldout_next_line.jsonl`` (its documents) and
``DIR/heldout_next_line.json`` (chance accuracy, counts and sources per domain).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_mile.evaluation import frequency

TASK = "heldout_next_line"
MIN_LINE_CHARS = 12  # shorter lines (blank, "}", "---") say little about the document
TRAIN, VALID, TEST = 0, 1, 2  # megatron-core's split indices


class TaskDataError(ValueError):
    """The data cannot give the task asked for; the message is one line."""


@dataclass(frozen=True)
class Item:
    domain: str
    document: int  # index of the document in the domain's dataset
    first_line: int  # the context's first line in the document (0: its start)
    context: str  # whole lines of the document, ending with a newline
    choices: list[str]
    label: int  # index of the true next line in ``choices``


@dataclass(frozen=True)
class TaskSettings:
    split: str = "969,30,1"  # the trainer's --split
    seq_length: int = 128  # context + any choice fit in this many tokens
    items_per_domain: int = 50
    choices: int = 4
    seed: int = 1234

    def check(self) -> None:
        if self.choices < 2:
            raise TaskDataError(f"--task-choices must be at least 2, got {self.choices}")
        if self.items_per_domain < 1:
            raise TaskDataError(f"--task-items-per-domain must be positive, got {self.items_per_domain}")


def split_documents(prefix: str, split: str, part: int) -> range:
    """Documents of ``prefix`` that megatron-core assigns to split ``part`` (0 train, 1 valid, 2 test)."""
    bounds = frequency.split_bounds(split, part)
    if bounds is None:
        return range(0)
    span = frequency.dataset_span(prefix, bounds)
    return range(span.begin, span.end)


def held_out_documents(prefix: str, split: str, shared_with_training: bool) -> tuple[list[int], int]:
    """Held-out document indices of ``prefix`` and how many were dropped as copies of training documents.

    ``shared_with_training``: the prefix also feeds training, and ``split`` carves its validation
    and test documents out; otherwise the whole dataset is held out.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    if not shared_with_training:
        return list(range(len(dataset))), 0
    held_out = list(split_documents(prefix, split, VALID)) + list(split_documents(prefix, split, TEST))
    training = split_documents(prefix, split, TRAIN)
    lengths = dataset.sequence_lengths
    # Only training documents of a held-out document's length can equal it: compare those alone.
    by_length: dict[int, list[int]] = {}
    for index in training:
        by_length.setdefault(int(lengths[index]), []).append(index)
    kept = [d for d in held_out
            if not any(np.array_equal(dataset[d], dataset[t]) for t in by_length.get(int(lengths[d]), ()))]
    return kept, len(held_out) - len(kept)


def _text(tokenizer, tokens: np.ndarray) -> str:
    ids = tokens.tolist()
    while ids and ids[-1] == tokenizer.eod:  # --append-eod closes every document
        ids.pop()
    return tokenizer.detokenize(ids)


def _context(lines: list[str], first: int, end: int) -> str:
    return "\n".join(lines[first:end]) + "\n"


def _is_line(line: str) -> bool:
    return len(line.strip()) >= MIN_LINE_CHARS


def _domain_items(domain: str, texts: dict[int, str], tokenizer, settings: TaskSettings) -> list[Item]:
    """Up to ``items_per_domain`` items from this domain's held-out documents ``{index: text}``."""
    rng = np.random.default_rng([settings.seed, zlib.crc32(domain.encode())])
    lines = {d: text.split("\n") for d, text in texts.items()}
    n_tokens = {}  # line -> its token count, as a choice

    def tokens_of(line: str) -> int:
        if line not in n_tokens:
            n_tokens[line] = len(tokenizer.tokenize(line))
        return n_tokens[line]

    # Every (document, next line): the context is the run of whole lines before it (from the
    # document's start where that fits) of at most half the window; the line and any distractor
    # are at most half as well, so every candidate fits after the context.
    half = settings.seq_length // 2
    cuts = []
    for d, doc_lines in lines.items():
        for j in range(1, len(doc_lines)):
            if not (_is_line(doc_lines[j]) and tokens_of(doc_lines[j]) <= half):
                continue
            first = j
            while first > 0 and len(tokenizer.tokenize(_context(doc_lines, first - 1, j))) <= half:
                first -= 1
            if first < j:
                cuts.append((d, first, j))
    pool = sorted({(d, line) for d, doc_lines in lines.items() for line in doc_lines
                   if _is_line(line) and tokens_of(line) <= half})
    items = []
    per_document = max(1, -(-settings.items_per_domain // max(len(texts), 1)))  # spread over documents
    taken: dict[int, int] = {}
    for k in rng.permutation(len(cuts)):
        if len(items) == settings.items_per_domain:
            break
        d, first, j = cuts[k]
        if taken.get(d, 0) == per_document:
            continue
        answer = lines[d][j]
        others = sorted({line for e, line in pool if e != d and line.strip() != answer.strip()})
        if len(others) < settings.choices - 1:
            continue
        distractors = [others[i] for i in rng.choice(len(others), settings.choices - 1, replace=False)]
        label = int(rng.integers(settings.choices))
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append(Item(domain, d, first, _context(lines[d], first, j), choices, label))
        taken[d] = taken.get(d, 0) + 1
    return items


def build_items(data_path: str | Sequence[str], tokenizer_model: str, settings: TaskSettings = TaskSettings(),
                tokenizer_type: Optional[str] = None) -> tuple[list[Item], dict]:
    """The task's items, and per domain: dataset, held-out documents used, copies dropped, items."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mile.data import build_tokenizer, load_blend

    settings.check()
    where = data_path if isinstance(data_path, str) else " ".join(data_path)
    blend = load_blend(data_path)
    if not blend.domains:
        raise TaskDataError(f"{where}: no domains; the task needs a blend JSON (tools/make_blend.py)")
    tokenizer = build_tokenizer(tokenizer_model, tokenizer_type)
    training = set(blend.train_prefixes)
    items, domains = [], {}
    for domain, prefix in sorted(blend.domains.items()):
        documents, copies = held_out_documents(prefix, settings.split, prefix in training)
        dataset = IndexedDataset(prefix)
        texts = {d: _text(tokenizer, dataset[d]) for d in documents}
        found = _domain_items(domain, texts, tokenizer, settings)
        items += found
        domains[domain] = {"dataset": prefix, "held_out_documents": len(documents),
                           "dropped_copies_of_training_documents": copies, "items": len(found),
                           "documents_used": sorted({item.document for item in found})}
    if not items:
        raise TaskDataError(f"{where}: no held-out document has a line to ask for (lines of at least "
                            f"{MIN_LINE_CHARS} characters after a context of at most {settings.seq_length // 2} "
                            "tokens); give the validation split more documents")
    return items, domains


def _yaml(jsonl: str, choices: int) -> str:
    # lm-eval moves the context's trailing newline into each continuation, so every choice is
    # scored as "\n" + line, like the text the model was trained on.
    return f"""# Pick a held-out document's true next line among {choices} (chance accuracy {1 / choices:.4g}).
# Written by megatron_mile.comparison.heldout_task; see {TASK}.json for its sources.
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(jsonl)}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(output_dir: str, data_path: str | Sequence[str], tokenizer_model: str,
               settings: TaskSettings = TaskSettings(), tokenizer_type: Optional[str] = None) -> dict:
    """Write the task into ``output_dir`` (replaced as a whole, atomically); returns its description."""
    items, domains = build_items(data_path, tokenizer_model, settings, tokenizer_type)
    output_dir = os.path.abspath(output_dir)
    staging = output_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    jsonl = os.path.join(output_dir, f"{TASK}.jsonl")  # the path lm-eval reads, after the rename
    with open(os.path.join(staging, f"{TASK}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items)
    with open(os.path.join(staging, f"{TASK}.yaml"), "w", encoding="utf-8") as f:
        f.write(_yaml(jsonl, settings.choices))
    info = {"task": TASK, "items": len(items), "choices": settings.choices, "chance_accuracy": 1 / settings.choices,
            "settings": asdict(settings), "tokenizer_model": os.path.abspath(tokenizer_model), "domains": domains}
    with open(os.path.join(staging, f"{TASK}.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    defaults = TaskSettings()
    p = argparse.ArgumentParser(prog="python -m megatron_mile.comparison.heldout_task",
                                description="Write the held-out next-line task for lm-eval (--include-path DIR).")
    p.add_argument("--data-path", nargs="+", required=True, help="the training blend JSON")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--split", default=defaults.split, help="the trainer's --split (default: %(default)s)")
    p.add_argument("--seq-length", type=int, default=defaults.seq_length,
                   help="the models' sequence length (default: %(default)s)")
    p.add_argument("--task-items-per-domain", type=int, default=defaults.items_per_domain,
                   help="default: %(default)s")
    p.add_argument("--task-choices", type=int, default=defaults.choices,
                   help="candidates per item; chance accuracy is 1/this (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    args = p.parse_args(argv)
    settings = TaskSettings(args.split, args.seq_length, args.task_items_per_domain, args.task_choices, args.seed)
    try:
        info = write_task(args.output_dir, args.data_path, args.tokenizer_model, settings)
    except (TaskDataError, ValueError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output_dir}/{TASK}.yaml: {info['items']} items, {args.task_choices} choices "
          f"(chance accuracy {info['chance_accuracy']:.4g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
