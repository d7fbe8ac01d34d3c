"""The fault boundary of rsir's front doors (the CLI, the flows' entry, the deployments' runs).

What the user can fix (bad input, a full or unwritable workspace, a broken service, a bad
environment value) ends in one line naming the path or URL and the operation; anything else is
a bug and keeps its traceback. Three parts:

- `check_environment`: the values rsir reads or passes on (tracking URI, Prefect API URL, the
  workspace's services and S3 endpoint) are checked before any work;
- `describe`/`boundary`: an exception that escapes becomes that one line (`RsirError`);
- `quiet_engine_failures`: Prefect's task and flow engines report a failure with its
  traceback at ERROR; those records go to the workspace's log file, not to the terminal,
  where the front door prints the one line.

No import of Prefect, MLflow or an HTTP client at module level: `rsir data list` uses this too.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import re
import socket
import sqlite3
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import RsirError
from core.workspace import Workspace

_REPO = Path(__file__).resolve().parent.parent
_PROJECT = tuple(str(_REPO / package) + os.sep for package in ("core", "storage", "models", "tasks", "flows",
                                                                 "deployments", "rsir"))
# MLflow 3.17's tracking stores (mlflow.tracking._tracking_service.utils): a database URL with an
# optional driver (postgresql+psycopg://), a tracking server, Databricks. File stores are refused.
_TRACKING_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc"}
_CONNECT_TIMEOUT_S = 5.0
_DB_ERROR = re.compile(r"\((sqlite3|psycopg2?|pymysql|MySQLdb)\.[A-Za-z.]+\) .*")


# ------------------------------------------------------------------ environment, before work
def check_environment(ws: Workspace, tracking_uri: str | None = None, prefect: bool = False) -> None:
    """Refuse, in one line naming the value, what would fail deep inside a run: an unknown
    MLflow tracking URI scheme or a tracking database that is not SQLite, an unreachable
    $PREFECT_API_URL or a corrupt Prefect database (with `prefect`), an S3 endpoint that is not
    a URL or does not answer. Reads only; raises RsirError."""
    from storage.tracking import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, ws.mlflow_db)
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in _TRACKING_SCHEMES:
        raise RsirError(f"MLflow tracking URI {redact_uri(uri)!r} (from {_origin(tracking_uri, 'MLFLOW_TRACKING_URI')}): "
                        f"unknown scheme {scheme or '(none)'!r}; use sqlite:///PATH, postgresql://..., "
                        f"mysql://... or http(s)://HOST:PORT")
    if scheme == "sqlite":
        check_sqlite(Path(uri.removeprefix("sqlite:///")), "MLflow tracking database")
    elif scheme in ("http", "https"):
        check_reachable(uri, f"MLflow tracking server (from {_origin(tracking_uri, 'MLFLOW_TRACKING_URI')})")
    if prefect:
        api = os.environ.get("PREFECT_API_URL")
        if api:
            check_reachable(api, "Prefect API (from $PREFECT_API_URL)")
        else:
            home = Path(os.environ.get("PREFECT_HOME") or ws.root / "prefect")
            check_sqlite(home / "prefect.db", "Prefect database")
    if ws.remote and ws.remote.startswith("s3://"):
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(name):
                check_reachable(os.environ[name], f"S3 endpoint (from ${name})")
                break


def _origin(given: str | None, variable: str) -> str:
    return "--tracking-uri" if given else f"${variable}" if os.environ.get(variable) else "the workspace default"


def check_sqlite(path: Path, what: str) -> None:
    """A SQLite database file that exists must open and list its tables (a garbage or truncated
    file would fail the service that opens it in hundreds of lines). Absent: fine, it is created."""
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            db.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise RsirError(f"{what} {path} cannot be opened ({exc}); move it aside (a new one is created) "
                        f"or restore it from a backup") from None


def check_reachable(url: str, what: str) -> None:
    """The URL is http(s)://HOST[:PORT]... and a TCP connection to it opens within 5 s."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RsirError(f"{what} {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RsirError(f"{what} {url!r} is not an http(s)://HOST[:PORT] URL")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RsirError(f"{what} {url} is unreachable: connecting to {parts.hostname}:{port} failed "
                        f"({exc.strerror or exc})") from None


# ------------------------------------------------------------------ escaped exceptions
def describe(exc: BaseException) -> str | None:
    """The one line for a fault the user can fix, found anywhere in the exception's chain; None
    for a bug (and for KeyboardInterrupt/SystemExit, which are not faults)."""
    if not isinstance(exc, Exception):
        return None
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, RsirError):
            return str(e)
    for e in chain:
        line = _service_line(e)
        if line is not None:
            return line
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None:
            return _os_line(e)
    return None


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """Re-raise a fault the user can fix as a one-line RsirError (the flow's state message and
    the CLI's line); a bug passes through with its traceback."""
    try:
        yield
    except Exception as exc:
        line = describe(exc)
        if line is None or isinstance(exc, RsirError):
            raise
        raise RsirError(line) from exc


_SERVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("rsir_service", default=None)


def naming_service(what: str) -> None:
    """Name the service a failure from MLflow or its database concerns ('MLflow tracking store
    sqlite:///...'), for the line `describe` writes; set by a flow once it knows the URI."""
    _SERVICE.set(what)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its explicit causes (`raise ... from`): how libraries wrap a fault. Not
    the implicit context: an error raised while handling another is a bug of the handler."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _os_line(exc: OSError) -> str:
    """'<operation> <path>: <reason> [ERRNO]' for a file-system (or socket) failure."""
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    reason = exc.strerror or os.strerror(exc.errno)
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    where = _operation(exc)
    if paths:
        return f"{where} failed on {paths}: {reason} [{name}]"
    return f"{where} failed: {' '.join(str(exc).split())} [{name}]"


def _operation(exc: BaseException) -> str:
    """The innermost frame of rsir's own code the exception passed through ('storage.files.
    write_bytes'): what rsir was doing, where the path alone would not say."""
    for inner in reversed(list(_chain(exc))):  # the innermost exception first (re-raised ones add frames)
        found = None
        for frame, _ in traceback.walk_tb(inner.__traceback__):
            filename = frame.f_code.co_filename
            if filename.startswith(_PROJECT) and not filename.endswith("boundary.py"):
                module = Path(filename).relative_to(_REPO).with_suffix("").as_posix().replace("/", ".")
                found = f"{module}.{frame.f_code.co_name}"
        if found:
            return found
    return "a workspace operation"


def _service_line(exc: BaseException) -> str | None:
    """A failed connection to a service or a database the service cannot read, by the
    exception's library (matched by module name: no import of the library here)."""
    module = type(exc).__module__ or ""
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    if module.startswith("httpx") or module.startswith(("requests", "urllib3")):
        url = getattr(getattr(exc, "request", None), "url", None)
        return f"connecting to {url or 'a service'} failed: {type(exc).__name__}: {first}"
    if module.startswith("botocore"):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url") if hasattr(exc, "kwargs") else None
        return f"S3 request{' to ' + endpoint if endpoint else ''} failed: {first}"
    if module.startswith(("sqlalchemy", "alembic", "mlflow")) or isinstance(exc, sqlite3.DatabaseError):
        from storage.tracking import redact_uri

        # MLflow and SQLAlchemy put the database's own words on a line of their long message.
        cause = next((m.group(0) for m in map(_DB_ERROR.search, str(exc).splitlines()) if m), first)
        service = _SERVICE.get() or ("MLflow" if module.startswith("mlflow") else "a service database")
        return f"{service} failed: {redact_uri(cause)[:300]}"
    if isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in first:
        db = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect") / "prefect.db"
        why = "it exited: is its database damaged? move it aside" if "exited with code" in first else \
            "the machine may be too busy; try again"
        return f"the local Prefect server (database {db}) did not start: {first.split('. ')[0]}; {why}"
    return None


# ------------------------------------------------------------------ Prefect's console
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _EngineFailures(logging.Filter):
    """Drops the reports of a failure that carry tracebacks from the console: Prefect's engines'
    ERROR records (the task's and the flow's tracebacks) and 'Finished in state Failed' lines,
    and MLflow's database errors with theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("mlflow"):
            return not (record.levelno >= logging.ERROR and record.exc_info)
        if not record.name.startswith(_ENGINE_LOGGERS):
            return True
        if record.levelno >= logging.ERROR or record.exc_info:
            return False
        message = record.getMessage()
        return "Finished in state Failed" not in message and "Finished in state Crashed" not in message


class _LogFile(logging.FileHandler):
    """The workspace's log file; a workspace that cannot take it (full, read-only) loses the
    log, never the run's one-line error."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


def quiet_engine_failures(ws: Workspace) -> Path:
    """Route Prefect's failure reports (with tracebacks) to `<workspace>/logs/rsir.log` and keep
    them off the console handlers. Returns the log file's path."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect configures its handlers once, lazily: first, so they are the ones adjusted

    log = ws.root / "logs" / "rsir.log"
    with contextlib.suppress(OSError):
        log.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(log, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    from storage.tracking import mlflow_logger

    mlflow_log = mlflow_logger()  # MLflow sets its handler up on import: first, so it is the one adjusted
    for logger in (*map(logging.getLogger, _ENGINE_LOGGERS), mlflow_log):
        if not any(isinstance(h, _LogFile) for h in logger.handlers):
            logger.addHandler(handler)
    for logger in (logging.getLogger(), logging.getLogger("prefect"), mlflow_log):
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and not any(isinstance(f, _EngineFailures) for f in h.filters):
                h.addFilter(_EngineFailures())
    return log


def print_error(line: str) -> None:
    """The front door's one line: `rsir: error: <line>` on stderr, whitespace folded."""
    print(f"rsir: error: {' '.join(line.split())}", file=sys.stderr, flush=True)
