"""Hugging Face copies of megatron-mile checkpoints, converted once and reused.

A run's checkpoint ``RUN/iter_NNNNNNN`` is converted (``checkpoint_conversion.convert_to_hf``)
into ``RUN/hf/iter_NNNNNNN``, or with a cache directory into
``CACHE/<run name>-<hash of its absolute path>/iter_NNNNNNN``. Checkpoints never change once
written, so the run and iteration are the key; ``conversion.json`` in the copy records the
checkpoint and the modification time of its ``metadata.json``, so a run retrained at the same path
is converted again rather than served stale. The copy is built under a temporary name and
renamed into place, and a lock file makes a second command converting the same checkpoint wait
for the first and then reuse its result.

Conversion runs in a spawned child process on the CPU: it starts its own one-process
``torch.distributed`` world and must not see the GPU that lm-eval uses afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from megatron_mile.evaluation.sources import CHECKPOINT_METADATA, HF, RUN, Source, SourceError

MARKER = "conversion.json"


def cache_path(source: Source, cache_dir: Optional[str] = None) -> str:
    """Where the HF copy of a run source's checkpoint lives (an HF source is its own path)."""
    if source.kind == HF:
        return source.path
    checkpoint = os.path.abspath(source.checkpoint)
    run_root, name = os.path.split(checkpoint)
    if cache_dir is None:
        return os.path.join(run_root, "hf", name)
    digest = hashlib.sha1(run_root.encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f"{os.path.basename(run_root)}-{digest}", name)


def _fingerprint(checkpoint: str) -> dict:
    metadata = os.path.join(os.path.abspath(checkpoint), CHECKPOINT_METADATA)
    return {"checkpoint": os.path.abspath(checkpoint), "metadata_mtime_ns": os.stat(metadata).st_mtime_ns}


def needs_conversion(source: Source, cache_dir: Optional[str] = None) -> bool:
    """A run whose checkpoint has no up-to-date copy in the cache."""
    if source.kind != RUN:
        return False
    try:
        with open(os.path.join(cache_path(source, cache_dir), MARKER), encoding="utf-8") as f:
            return json.load(f) != _fingerprint(source.checkpoint)
    except (OSError, ValueError):
        return True


def _load_common(checkpoint: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(checkpoint)
    except Exception as err:  # torch.load / pickle raise many types on a damaged file
        raise SourceError(f"{checkpoint}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(common, dict) or not all(k in common for k in ("args", "vocab_size")):
        raise SourceError(f"{checkpoint}: not a megatron-mile checkpoint (no args/vocab_size)")
    return common


def check_run_tokenizer(source: Source) -> None:
    """Before converting: the run's tokenizer exists and fits the checkpoint's embedding."""
    from megatron_mile.data.tokenizer import build_tokenizer

    common = _load_common(source.checkpoint)
    path = common["args"].get("tokenizer_model")
    try:
        tokenizer = build_tokenizer(path, common["args"].get("tokenizer_type"))
    except ValueError as err:
        raise SourceError(f"{source.path}: the run's tokenizer cannot be used ({err}); convert with "
                          "checkpoint_conversion/convert_to_hf.py --tokenizer-model and evaluate that directory"
                          ) from None
    if tokenizer.vocab_size > common["vocab_size"]:
        raise SourceError(f"{source.path}: tokenizer {path} has {tokenizer.vocab_size} tokens, more than the "
                          f"{common['vocab_size']} rows of the checkpoint's embedding")


@contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cpu_only() -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _convert_in_child(checkpoint: str, output: str) -> None:
    from checkpoint_conversion.convert_to_hf import convert_checkpoint

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_cpu_only) as pool:
        pool.submit(convert_checkpoint, checkpoint, output, overwrite=True).result()


def hf_directory(source: Source, cache_dir: Optional[str] = None, log: Callable[[str], None] = print) -> str:
    """The HF model directory to evaluate for ``source``, converting its checkpoint if needed."""
    path = cache_path(source, cache_dir)
    if source.kind != RUN:
        return path
    with _locked(path):
        if not needs_conversion(source, cache_dir):
            log(f"{source.label}: using the conversion of {source.checkpoint} in {path}")
            return path
        log(f"{source.label}: converting {source.checkpoint} -> {path}")
        start = time.monotonic()
        staging = path + ".partial"
        _convert_in_child(source.checkpoint, staging)
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump(_fingerprint(source.checkpoint), f, indent=2)
        if os.path.exists(path):  # a stale copy: the run was retrained at this path
            shutil.rmtree(path)
        os.replace(staging, path)
        log(f"{source.label}: converted in {time.monotonic() - start:.0f} s")
    return path
