"""Streaming reader for JSONL, ``.jsonl.zst`` and ``.jsonl.gz``: blocks of whole lines, never a whole file.

Decompression is driven by hand (``decompressobj``) rather than through a stream reader because
``zstandard``'s stream reader reports a truncated frame as a clean end of file; here a stream that
stops mid-frame raises :class:`TruncatedInput`, after every complete line before it was yielded.
"""

from __future__ import annotations

import glob
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import zstandard

READ_SIZE = 1 << 20
# The Pile's shards were compressed with long windows; allow up to 2 GiB like `zstd --long=31`.
_ZSTD_MAX_WINDOW = 1 << 31


class TruncatedInput(Exception):
    """The compressed stream ended (or broke) before its end-of-frame marker."""


@dataclass(frozen=True)
class Block:
    """Consecutive whole lines of one file; ``first_line`` is the 1-based number of its first line."""

    path: str
    first_line: int
    data: bytes


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files and globs, in the order given, each glob sorted; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            raise ValueError(f"--input {pattern}: is a directory; pass a glob such as "
                             f"{os.path.join(pattern, '*.jsonl.zst')}")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"--input {pattern}: no such file")
        files.extend(m for m in matches if m not in files)
    return files


def _frames(f: BinaryIO, new_decompressor: Callable[[], object], error: type[Exception], name: str,
            ) -> Iterator[bytes]:
    """Decompress frame after frame (concatenated zst frames, multi-member gzip) until the input ends."""
    dobj, fed = new_decompressor(), False
    while raw := f.read(READ_SIZE):
        while raw:
            try:
                out = dobj.decompress(raw)
            except error as exc:
                raise TruncatedInput(f"corrupt {name} stream ({exc})") from None
            fed = True
            if out:
                yield out
            if dobj.eof:  # restart on the bytes after this frame
                raw, dobj, fed = dobj.unused_data, new_decompressor(), False
            else:
                raw = b""
    if fed and not dobj.eof:
        raise TruncatedInput(f"truncated {name} stream")


def _zst_chunks(f: BinaryIO) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    return _frames(f, dctx.decompressobj, zstandard.ZstdError, "zst")


def _gz_chunks(f: BinaryIO) -> Iterator[bytes]:
    return _frames(f, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), zlib.error, "gz")


def _plain_chunks(f: BinaryIO) -> Iterator[bytes]:
    while raw := f.read(READ_SIZE):
        yield raw


def decompressed_chunks(path: str) -> Iterator[bytes]:
    """Raw decompressed bytes of ``path``, chosen by extension (.zst / .gz / anything else plain)."""
    reader = _zst_chunks if path.endswith(".zst") else _gz_chunks if path.endswith(".gz") else _plain_chunks
    with open(path, "rb") as f:
        yield from reader(f)


def read_blocks(path: str, block_bytes: int = 1 << 20) -> Iterator[Block]:
    """Yield blocks of about ``block_bytes`` whole lines.

    On a truncated stream, the complete lines before the break are yielded, then ``TruncatedInput``
    is raised with ``.line`` set to the number of the partial (lost) line.
    """
    pending = bytearray()
    line = 1
    try:
        for chunk in decompressed_chunks(path):
            pending += chunk
            # Decompressed chunks can be many MB: cut them into blocks of about block_bytes each,
            # so workers get even shares (a line longer than block_bytes makes a block of its own).
            while len(pending) >= block_bytes:
                cut = (pending.rfind(b"\n", 0, block_bytes) + 1) or (pending.find(b"\n", block_bytes) + 1)
                if not cut:
                    break
                data = bytes(pending[:cut])
                del pending[:cut]
                yield Block(path, line, data)
                line += data.count(b"\n")
    except TruncatedInput as exc:
        cut = pending.rfind(b"\n") + 1
        if cut:
            yield Block(path, line, bytes(pending[:cut]))
            line += pending.count(b"\n", 0, cut)
        exc.line = line
        raise
    if pending:
        yield Block(path, line, bytes(pending))
