"""Turning one block of JSONL lines into token arrays, with every rejected line accounted for.

This is the per-worker step of preprocessing: pure, deterministic, and independent of the other
blocks, so any number of workers produces the same stream of documents in input order.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron_mile.data.jsonl import Block

# Skip reasons, as printed in the summary.
NOT_JSON = "not JSON"
NOT_OBJECT = "not a JSON object"
INVALID_UTF8 = "invalid UTF-8"
MISSING_KEY = "missing key"
NON_STRING = "non-string text"
EMPTY = "empty document"
MISSING_DOMAIN = "missing domain"
UNENCODABLE = "unencodable text"
TRUNCATED = "truncated or corrupt stream"


@dataclass
class EncodeSpec:
    """What to extract from each line and how to encode it."""

    tokenizer: object  # a megatron_mile.data.tokenizer tokenizer (has tokenize / tokenize_batch / eod)
    json_keys: Sequence[str]
    dtype: type
    append_eod: bool = False
    domain_key: Optional[str] = None  # dotted path, e.g. "meta.pile_set_name"


@dataclass
class EncodedBlock:
    """Documents of one block, in line order: ``tokens[k]`` holds the concatenated ids for key k."""

    path: str
    domains: list[Optional[str]] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, detail)
    blank_lines: int = 0
    nbytes: int = 0


def lookup(record: dict, dotted: str) -> object:
    """``record["meta"]["pile_set_name"]`` for ``"meta.pile_set_name"``; KeyError when absent."""
    value: object = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _parse(line: bytes, spec: EncodeSpec) -> tuple[Optional[str], list[str]]:
    """Domain and texts of one line; raises ValueError((reason, detail)) for a bad line."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        raise ValueError(INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(NOT_JSON, f"not JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(NOT_OBJECT, f"not a JSON object ({type(record).__name__})")
    texts = []
    for key in spec.json_keys:
        if key not in record:
            raise ValueError(MISSING_KEY, f"missing key {key!r}")
        text = record[key]
        if not isinstance(text, str):
            raise ValueError(NON_STRING, f"key {key!r} is {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(EMPTY, f"empty document in key {key!r}")
        texts.append(text)
    domain = None
    if spec.domain_key is not None:
        try:
            domain = lookup(record, spec.domain_key)
        except KeyError:
            raise ValueError(MISSING_DOMAIN, f"missing domain key {spec.domain_key!r}") from None
        if not isinstance(domain, str) or not domain:
            raise ValueError(MISSING_DOMAIN, f"domain key {spec.domain_key!r} is not a non-empty string")
    return domain, texts


def _tokenize_all(tokenizer, texts: list[str]) -> list[Optional[list[int]]]:
    """Batch-encode; when the batch fails (e.g. a lone surrogate), find the culprits one by one."""
    try:
        return tokenizer.tokenize_batch(texts)
    except (UnicodeError, TypeError, RuntimeError, ValueError):
        out: list[Optional[list[int]]] = []
        for text in texts:
            try:
                out.append(tokenizer.tokenize(text))
            except (UnicodeError, TypeError, RuntimeError, ValueError):
                out.append(None)
        return out


def encode_block(block: Block, spec: EncodeSpec) -> EncodedBlock:
    result = EncodedBlock(block.path, nbytes=len(block.data))
    lines = block.data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the block ends with a newline
    line_numbers: list[int] = []
    domains: list[Optional[str]] = []
    texts: list[list[str]] = [[] for _ in spec.json_keys]
    for offset, line in enumerate(lines):
        if not line.strip():
            result.blank_lines += 1
            continue
        try:
            domain, line_texts = _parse(line, spec)
        except ValueError as exc:
            reason, detail = exc.args
            result.errors.append((block.first_line + offset, reason, detail))
            continue
        line_numbers.append(block.first_line + offset)
        domains.append(domain)
        for k, text in enumerate(line_texts):
            texts[k].append(text)

    ids = [_tokenize_all(spec.tokenizer, key_texts) for key_texts in texts]
    eod = [spec.tokenizer.eod] if spec.append_eod else []
    kept = []
    for i, line_no in enumerate(line_numbers):
        per_key = [key_ids[i] for key_ids in ids]
        if any(doc is None for doc in per_key):
            result.errors.append((line_no, UNENCODABLE, "text the tokenizer cannot encode"))
        elif any(not doc for doc in per_key):
            result.errors.append((line_no, EMPTY, "document has no tokens"))
        else:
            kept.append(i)
    result.errors.sort()
    result.domains = [domains[i] for i in kept]
    for key_ids in ids:
        docs = [key_ids[i] + eod for i in kept]
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        result.lengths.append(lengths)
        flat = itertools.chain.from_iterable(docs)
        result.tokens.append(np.fromiter(flat, dtype=spec.dtype, count=int(lengths.sum())))
    return result
