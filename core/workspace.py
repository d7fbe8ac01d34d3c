"""The workspace: where all state lives (datasets, checkpoints, run artifacts, MLflow).

A home is a local directory or any fsspec URL (``s3://bucket/prefix``). Shared state (datasets,
checkpoints, run artifacts, MLflow artifacts) lives under the home; what must be a local file
(staging before a commit, downloads, Prefect's state, the default MLflow SQLite database) lives
in `root`: the home itself when it is local, else a local companion directory under
``$RSIR_CACHE`` (default ``~/.cache/rsir``) named by the home's URL."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import RsirError

_URL_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and _URL_RE.match(location) is not None


def resolve_home(home: str | os.PathLike | None = None) -> Path | str:
    """--home wins, then $RSIR_HOME, then ./workspace. A URL stays a URL (without a trailing /)."""
    chosen = home or os.environ.get("RSIR_HOME") or "workspace"
    if is_url(chosen):
        return str(chosen).rstrip("/")
    return Path(chosen).expanduser().resolve()


def check_directory(root: Path) -> None:
    """The workspace must be a directory or creatable as one: a regular file there (or above)
    would otherwise fail deep inside the first write, or look like an empty workspace."""
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                below = "" if path == root else f" ({path} is a file)"
                raise RsirError(f"workspace {root} is not a directory{below}; choose another --home or $RSIR_HOME")
            return


def check_scheme(url: str) -> None:
    """A workspace URL's scheme must name a file system fsspec knows and can load (s3 needs
    s3fs): else every command would fail in its first listing, with a traceback."""
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise RsirError(f"workspace URL {url!r}: unknown scheme {scheme!r}; use a directory or an fsspec URL "
                        f"such as s3://bucket/prefix (from --home or $RSIR_HOME)") from None
    except ImportError as exc:
        raise RsirError(f"workspace URL {url!r}: scheme {scheme!r} needs a package that is not installed "
                        f"({' '.join(str(exc).split())})") from None


def companion(url: str) -> Path:
    """The local directory of a remote home: the same on every call for the same URL."""
    cache = Path(os.environ.get("RSIR_CACHE") or Path.home() / ".cache" / "rsir").expanduser().resolve()
    scheme = url.split("://", 1)[0]
    return cache / f"{scheme}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Workspace:
    root: Path  # local: the home, or a remote home's local companion
    remote: str | None = None  # the home's URL when it is not a local directory

    @classmethod
    def at(cls, home: str | os.PathLike | None = None) -> "Workspace":
        resolved = resolve_home(home)
        if isinstance(resolved, str):
            check_scheme(resolved)
            root = companion(resolved)
            check_directory(root)
            return cls(root, resolved)
        check_directory(resolved)
        return cls(resolved)

    @property
    def home(self) -> str:
        """What names this workspace to another process (tasks, workers): path or URL."""
        return self.remote or str(self.root)

    def shared(self, *parts: str) -> Path | str:
        """A location under the home: a Path for a local home, else a URL."""
        if self.remote is None:
            return self.root.joinpath(*parts)
        return "/".join([self.remote, *parts])

    @property
    def datasets(self) -> Path | str:
        return self.shared("datasets")

    @property
    def checkpoints(self) -> Path | str:
        return self.shared("checkpoints")

    @property
    def runs(self) -> Path | str:
        """Intermediate artifacts of generation runs (rollouts, accepted sequences, ranks)."""
        return self.shared("runs")

    @property
    def mlartifacts(self) -> Path | str:
        return self.shared("mlartifacts")

    @property
    def staging(self) -> Path:
        # Local, and outside every dataset root: a leftover staging folder never shows up in a scan.
        return self.root / "staging"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"
