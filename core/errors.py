"""User-facing errors and warnings: one clear line, raised before any compute where possible."""

from __future__ import annotations

import sys


class RsirError(Exception):
    """An error caused by input (config, data, paths) that the user can fix.

    The CLI prints its message as one line and exits with status 2; anything else
    is a bug and keeps its traceback.
    """


_warned: set[str] = set()


def warn(message: str) -> None:
    """Tell the user about input that is accepted but cannot be fully checked: one line on
    stderr, `rsir: warning: <message>`, once per process (a flow applies one checkpoint in
    several tasks; the same sentence each time would only be noise)."""
    if message in _warned:
        return
    _warned.add(message)
    print(f"rsir: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)
