"""Output directories that appear only when complete: written under ``NAME.tmp``, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def staged_directory(final: str) -> Iterator[str]:
    """Yield an empty ``final.tmp``; replace ``final`` with it on success, remove it on any failure."""
    staging = final.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
