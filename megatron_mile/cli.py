"""Command-line parsing shared by the trainer and the tools.

``ArgumentParser`` reports a usage error (an unknown flag, a bad value) in one line and
exits with code 2. ``DefaultsHelpFormatter`` makes ``--help`` show every option's real
default: the argparse default itself, so it cannot disagree with what a run uses.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option that takes a value and has a default.

    Switches (``store_true``/``store_false``) show no default: their help says what they do.
    An option whose default is None says in its own help what happens without it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        takes_value = action.nargs != 0
        if takes_value and action.default not in (None, argparse.SUPPRESS) and "(default:" not in help_text:
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            help_text += f" (default: {shown})"
        return help_text.strip()
