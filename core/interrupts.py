"""Whether this process has been asked to stop (SIGINT, SIGTERM) while a command runs.

The CLI's signal handler notes each signal here (rsir/cli.py `_interrupts`, which also clears
them when its command ends); code that ends a run after an exception reads `stop_status`. Why:
the KeyboardInterrupt a signal raises does not always reach that code as itself. A library in
between may turn it into an ordinary exception (seen in CI: an `rsir experiment` cut by Ctrl-C
as its iteration's Prefect subflow began left its MLflow run FAILED, not KILLED), and a run
labelled FAILED reads as a fault of the run, not as the interrupt it was.
"""

from __future__ import annotations

_received: list[int] = []


def note(signum: int) -> None:
    """Record that signal `signum` asked this process to stop."""
    _received.append(signum)


def clear() -> None:
    """Forget the signals noted (the command they interrupted has ended)."""
    _received.clear()


def stop_status(exc: BaseException) -> str:
    """MLflow's status for a run that `exc` ended: KILLED when the process was interrupted (a
    signal noted, or a KeyboardInterrupt or other BaseException such as Prefect's
    TerminationSignal), FAILED for an error of its own."""
    return "KILLED" if _received or not isinstance(exc, Exception) else "FAILED"
