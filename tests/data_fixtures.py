"""Tiny corpora and tokenizers built on the spot (no hub access) for the data-pipeline tests."""

from __future__ import annotations

import gzip
import io
import json
import os

import zstandard

DOMAINS = ("ArXiv", "Gutenberg (PG-19)")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def documents(n: int) -> list[dict]:
    """Deterministic Pile-style records alternating between two domains, with varied lengths."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i * 13) % 40)]
        text = f"Document {i}: " + " ".join(words) + ("\n    indented line é" if i % 5 == 0 else "")
        out.append({"text": text, "meta": {"pile_set_name": DOMAINS[i % 2]}})
    return out


def jsonl_bytes(records: list) -> bytes:
    return b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in records)


def write(path: str, data: bytes) -> str:
    """Write ``data`` (uncompressed JSONL bytes), compressed according to the extension."""
    if path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path


def train_sentencepiece(path: str, vocab_size: int = 300) -> str:
    import sentencepiece

    lines = [r["text"] for r in documents(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def source_lines(n: int) -> list[str]:
    """The first ``n`` non-empty lines of a few standard-library modules: real text with
    indentation, runs of spaces, punctuation, code and prose, the same on every machine
    with this Python."""
    import argparse
    import difflib
    import textwrap

    lines = []
    for module in (textwrap, difflib, argparse):
        with open(module.__file__, encoding="utf-8") as f:
            lines += [line for line in f.read().splitlines() if line.strip()]
    assert len(lines) >= n, f"only {len(lines)} source lines"
    return lines[:n]


def train_hf_tokenizer(directory: str, lines: list[str] | None = None) -> str:
    """A tiny byte-level BPE fast tokenizer saved as an HF directory with an eos token
    (trained on ``lines``, by default the text of ``documents(400)``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines if lines is not None else [r["text"] for r in documents(400)], trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"}}, f)
    return directory
