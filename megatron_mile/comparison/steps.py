"""Steps that run once: a completion marker per step, written last, makes a rerun skip it.

A step has a name, a *key* (everything its result depends on: settings, the checkpoint it reads)
and work that returns a JSON-serialisable result. ``Steps.run`` skips the work when
``ROOT/steps/<name>.json`` holds the same key, and otherwise runs it and then writes the marker
``{"key", "result", "elapsed_s"}`` through a temporary file and a rename, so an interrupted step
has no marker and runs again. Every step prints a start line and a line with its elapsed time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

RAN, REUSED = "ran", "reused"


def write_text(path: str, text: str) -> None:
    """Write through ``path.tmp`` and a rename: readers see the old file or the new one, never a part."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``, or None when it is missing or unreadable (e.g. cut short)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class StepRecord:
    name: str
    status: str  # RAN or REUSED
    elapsed_s: float  # this time (REUSED: the time spent checking)
    first_elapsed_s: float  # the time the work took when it ran


class Steps:
    """The steps of one comparison, with markers under ``root/steps``; ``records`` lists what happened."""

    def __init__(self, root: str, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.log = log
        self.records: list[StepRecord] = []

    def marker(self, name: str) -> str:
        return os.path.join(self.root, "steps", f"{name}.json")

    def cached(self, name: str, key: Any) -> Optional[dict]:
        """The step's marker if it ran with this key (compared as JSON, as it was stored)."""
        marker = read_json(self.marker(name))
        return marker if marker is not None and marker.get("key") == json.loads(json.dumps(key)) else None

    def run(self, name: str, key: Any, work: Callable[[], Any], what: str,
            still_valid: Optional[Callable[[Any], bool]] = None) -> Any:
        """``work()``'s result, from the marker when the step already ran with this key.

        ``still_valid(result)`` checks that what the step made is still there (e.g. a run directory
        that was not deleted since); when it is not, the step runs again.
        """
        start = time.monotonic()
        marker = self.cached(name, key)
        if marker is not None and (still_valid is None or still_valid(marker["result"])):
            elapsed = time.monotonic() - start
            self.records.append(StepRecord(name, REUSED, elapsed, marker["elapsed_s"]))
            self.log(f"[{name}] done before (took {marker['elapsed_s']:.1f} s then): reused")
            return marker["result"]
        self.log(f"[{name}] {what}")
        result = work()
        elapsed = time.monotonic() - start
        write_json(self.marker(name), {"key": key, "result": result, "elapsed_s": elapsed})
        self.records.append(StepRecord(name, RAN, elapsed, elapsed))
        self.log(f"[{name}] done in {elapsed:.1f} s")
        return result

    def summary(self) -> str:
        """One line per step: ran or reused, and its time."""
        lines = []
        for r in self.records:
            took = (f"{r.elapsed_s:.1f} s" if r.status == RAN
                    else f"{r.elapsed_s:.2f} s (ran in {r.first_elapsed_s:.1f} s)")
            lines.append(f"  {r.name:<32} {r.status:<7} {took}")
        return "\n".join(lines)
