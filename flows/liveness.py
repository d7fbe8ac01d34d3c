"""Liveness: close the runs whose process died, by one rule (`storage.tracking.dead_reason`: the
run's process is gone on this machine, or its heartbeat is stale elsewhere), never by the
RUNNING state a killed process leaves behind.

A run of a lineage closes its lineage's dead runs when it starts (flows/rsir.py). A run that no
later run resumes (a worker killed with its flow-run process) is closed by the sweep, which
`rsir serve` runs periodically and anyone can run:

    python -m flows.liveness [--home DIR] [--tracking-uri URI]

It marks every dead rsir parent run of every experiment KILLED (and its iteration cut short),
and its Prefect flow run CRASHED (with its open subflow and task runs) on the Prefect API of
$PREFECT_API_URL; one line per run closed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from core.workspace import Workspace
from storage.tracking import Tracker, mlflow_environment_defaults, redact_uri, resolve_tracking_uri

# Every rsir flow's parent run carries its lineage tag; iterations and other runs do not.
PARENT_RUNS = "tags.`rsir.lineage` LIKE '%'"


@dataclass(frozen=True)
class Closed:
    """A dead run that was closed: its MLflow run id, why it is dead, what became of its Prefect flow run."""

    run_id: str
    reason: str
    prefect: str
    experiment: str = ""


def close_dead_runs(tracker: Tracker, filter_string: str, this_flow_run: str = "") -> list[Closed]:
    """Close the dead runs matching `filter_string`: the MLflow run (and its RUNNING children)
    KILLED, its Prefect flow run CRASHED. `this_flow_run`: the flow run of the caller, which
    Prefect may be running again under the dead run's id (then it is not crashed)."""
    closed = []
    for dead in tracker.dead_runs(filter_string):
        tracker.kill(dead.run_id)
        flow_run = dead.tags.get("prefect.flow_run_id", "")
        if not flow_run:
            prefect = "no Prefect flow run"
        elif flow_run == this_flow_run:  # Prefect runs a crashed flow run again under its id
            prefect = f"Prefect flow run {flow_run} runs again as this run"
        else:
            prefect = crash_flow_run(flow_run, f"killed: {dead.reason}; MLflow run {dead.run_id} was marked "
                                               "KILLED by rsir's liveness rule")
        closed.append(Closed(dead.run_id, dead.reason, prefect, tracker.experiment_name))
    return closed


def close_killed_lineage(tracker: Tracker, lineage: str, this_flow_run: str) -> None:
    """What a run does first: close what a killed run of its lineage left open, its MLflow
    parent run (and an iteration cut short) KILLED, its Prefect flow run CRASHED; one log line
    each (the same rule `rsir serve` sweeps with). A live run of the lineage stays open."""
    from prefect import get_run_logger

    logger = get_run_logger()
    for closed in close_dead_runs(tracker, f"tags.`rsir.lineage` = '{lineage}'", this_flow_run):
        logger.warning("closed a killed run of lineage %s (%s): MLflow run %s KILLED, %s; this run resumes its work",
                       lineage, closed.reason, closed.run_id, closed.prefect)


def sweep(tracking_uri: str) -> list[Closed]:
    """Close every dead rsir parent run of every experiment of the tracking store."""
    closed = []
    for name in Tracker.experiment_names(tracking_uri):
        closed += close_dead_runs(Tracker.open(tracking_uri, name), PARENT_RUNS)
    return closed


@dataclass(frozen=True)
class TaggedRuns:
    """What an interrupt's closing did in Prefect: (flow run id, what became of it) for each top
    flow run of the interrupted command, and every flow run of it that had not completed, its
    subflows included (they inherit the tag): the flow runs whose MLflow runs are to be closed."""

    closed: list[tuple[str, str]]
    open_flow_runs: list[str]


def cancel_tagged_flow_runs(tag: str, message: str) -> TaggedRuns:
    """After an interrupt: every flow run tagged `tag` (the runs of one interrupted command) that
    did not complete, CANCELLED with its open subflow and task runs. Never raises."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[tag]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.COMPLETED]))))
    except Exception as exc:  # the server is unreachable: say so
        return TaggedRuns([("", f"Prefect flow runs not marked ({type(exc).__name__})")], [])
    return TaggedRuns([(str(run.id), crash_flow_run(str(run.id), message, Cancelled)) for run in runs
                       if run.parent_task_run_id is None],  # subflows: closed with their parent, below
                      [str(run.id) for run in runs])


def crash_flow_run(flow_run_id: str, message: str, final: Any = None) -> str:
    """Set a killed Prefect flow run CRASHED (or the state `final` makes: an interrupted one
    CANCELLED), with its subflow runs and task runs that had not ended (the killed process left
    them Running too); says what became of the flow run. Never raises: the MLflow run is closed
    all the same, and this run goes on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import TERMINAL_STATES, StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    final = final or Crashed
    open_states = [t for t in StateType if t not in TERMINAL_STATES]
    try:
        with get_client(sync_client=True) as client:
            root = client.read_flow_run(flow_run_id)
            pending, outcome = [root], f"Prefect flow run {flow_run_id} had ended ({root.state_name})"
            while pending:
                run = pending.pop()
                # An interrupt may find a run Prefect already marked CRASHED: it becomes `final`.
                if run.state is None or not run.state.is_final() or (final is not Crashed and run.state.is_crashed()):
                    state = client.set_flow_run_state(run.id, final(message=message), force=True).state
                    if run.id == root.id:
                        outcome = f"Prefect flow run {flow_run_id} {state.name.upper() if state else 'not marked'}"
                pending += client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
                for task_run in client.read_task_runs(task_run_filter=TaskRunFilter(
                        flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]),
                        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=open_states)))):
                    client.set_task_run_state(task_run.id, final(message=message), force=True)
            return outcome
    except ObjectNotFound:  # it ran against another Prefect server (or was deleted)
        return f"Prefect flow run {flow_run_id} unknown to this Prefect server"
    except Exception as exc:  # the server is unreachable or refused: say so, the run goes on
        reason = (str(exc).splitlines() or [""])[0][:200]
        return f"Prefect flow run {flow_run_id} not marked ({type(exc).__name__}: {reason})"


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.liveness`: one sweep; one line per closed run on stdout, a fault in one
    line on stderr (exit 2)."""
    from flows.boundary import describe, print_error

    mlflow_environment_defaults(os.environ)
    parser = argparse.ArgumentParser(prog="python -m flows.liveness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="workspace (default $RSIR_HOME or ./workspace)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else the workspace's)")
    args = parser.parse_args(argv)
    try:
        ws = Workspace.at(args.home)
        uri = resolve_tracking_uri(args.tracking_uri, ws.mlflow_db)
        closed = sweep(uri)
    except Exception as exc:
        line = describe(exc)
        if line is None:
            raise
        print_error(line)
        sys.exit(2)
    for run in closed:
        print(f"closed MLflow run {run.run_id} of experiment {run.experiment!r} KILLED ({run.reason}); {run.prefect}")
    print(f"liveness sweep of {redact_uri(uri)}: {len(closed)} dead run(s) closed", file=sys.stderr)


if __name__ == "__main__":
    main()
