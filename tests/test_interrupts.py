"""A run ended by an exception is KILLED when the process was interrupted, whatever type the
interrupt reached it as (a library may wrap the KeyboardInterrupt), and FAILED for its own error."""

from __future__ import annotations

import pytest

from core import interrupts
from storage.tracking import Tracker


@pytest.fixture(autouse=True)
def _clean():
    interrupts.clear()
    yield
    interrupts.clear()


def test_stop_status_reads_the_signal_not_the_exception_type():
    assert interrupts.stop_status(ValueError("a fault")) == "FAILED"
    assert interrupts.stop_status(KeyboardInterrupt()) == "KILLED"
    interrupts.note(2)
    assert interrupts.stop_status(RuntimeError("what a library made of Ctrl-C")) == "KILLED"
    interrupts.clear()
    assert interrupts.stop_status(RuntimeError("a fault")) == "FAILED"


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_heartbeat_block_ends_its_run_killed_after_a_signal_failed_otherwise(tmp_path, interrupted):
    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "x")
    run = tracker.start_run("r")
    if interrupted:
        interrupts.note(2)
    with pytest.raises(RuntimeError), tracker.heartbeat(run):
        raise RuntimeError("wrapped interrupt" if interrupted else "a fault")
    assert tracker._client.get_run(run).info.status == ("KILLED" if interrupted else "FAILED")
