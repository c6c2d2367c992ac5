#!/usr/bin/env python
"""Build a small multi-domain, Pile-format corpus from text every Python installation has.

Each line is {"text": ..., "meta": {"pile_set_name": DOMAIN}}, written as .jsonl.zst. Domains:

  Github      standard-library source files (.py)
  Docstrings  module, class and function docstrings of the standard library (read with ast, not imported)
  Licenses    LICENSE / COPYING / NOTICE / AUTHORS files of installed distributions
  READMEs     long descriptions from installed distributions' METADATA files

The output is deterministic for a given installation: sorted walks, a seeded shuffle, no
timestamps, fixed zstd level. Each domain is capped at --max-domain-mb of text.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import sysconfig
from typing import Iterator

import zstandard

MAX_DOC_CHARS = 100_000  # long files are cut into several documents of at most this size


def _walk(root: str, skip_dirs: tuple[str, ...] = ()) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and d != "__pycache__")
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _pieces(text: str) -> Iterator[str]:
    """Cut at line boundaries into documents of at most MAX_DOC_CHARS."""
    while len(text) > MAX_DOC_CHARS:
        cut = text.rfind("\n", 0, MAX_DOC_CHARS) + 1 or MAX_DOC_CHARS
        yield text[:cut]
        text = text[cut:]
    if text.strip():
        yield text


def stdlib_sources(stdlib: str) -> Iterator[tuple[str, str]]:
    for path in _walk(stdlib, skip_dirs=("site-packages", "dist-packages", "idlelib", "tkinter")):
        if path.endswith(".py") and (text := _read(path)):
            yield os.path.relpath(path, stdlib), text


def docstrings(module_name: str, source: str) -> str | None:
    """All docstrings of a module, each headed by its qualified name."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # lib2to3 test data etc.
        return None
    parts = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            parts.append(f"{qualname}\n\n{doc}\n")
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module_name)
    return "\n".join(parts) if parts else None


def distribution_texts(site_packages: str) -> Iterator[tuple[str, str]]:
    """(domain, text) for license files and README long descriptions of installed distributions."""
    for entry in sorted(os.listdir(site_packages)):
        if not entry.endswith(".dist-info"):
            continue
        for path in _walk(os.path.join(site_packages, entry)):
            name = os.path.basename(path).upper()
            if name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")):
                if text := _read(path):
                    yield "Licenses", text
            elif name == "METADATA" and (text := _read(path)):
                # The long description is the body after the first blank line of the headers.
                body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
                if len(body.strip()) > 200:
                    yield "READMEs", body


def collect(max_domain_bytes: int) -> list[dict]:
    paths = sysconfig.get_paths()
    stdlib, site_packages = paths["stdlib"], paths["purelib"]
    budget: dict[str, int] = {}
    records = []

    def add(domain: str, text: str) -> None:
        for piece in _pieces(text):
            if budget.get(domain, 0) >= max_domain_bytes:
                return
            budget[domain] = budget.get(domain, 0) + len(piece.encode("utf-8"))
            records.append({"text": piece, "meta": {"pile_set_name": domain}})

    for relpath, source in stdlib_sources(stdlib):
        add("Github", source)
        module = relpath[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if doc := docstrings(module, source):
            add("Docstrings", doc)
    for domain, text in distribution_texts(site_packages):
        add(domain, text)
    random.Random(0).shuffle(records)  # interleave domains like the Pile's shards
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="path of the .jsonl.zst to write")
    parser.add_argument("--max-domain-mb", type=float, default=6.0, help="text cap per domain, in MB")
    args = parser.parse_args(argv)

    records = collect(int(args.max_domain_mb * 1e6))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    partial = args.output + ".partial"
    with open(partial, "wb") as raw:
        with zstandard.ZstdCompressor(level=10).stream_writer(raw) as out:
            for record in records:
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(partial, args.output)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["meta"]["pile_set_name"]] = counts.get(record["meta"]["pile_set_name"], 0) + 1
    summary = ", ".join(f"{d}: {n}" for d, n in sorted(counts.items()))
    print(f"{args.output}: {len(records)} documents ({summary}), {os.path.getsize(args.output) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
