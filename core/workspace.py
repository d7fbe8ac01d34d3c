"""The workspace: the one directory that holds all state (datasets, checkpoints, MLflow)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import RsirError


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """--home wins, then $RSIR_HOME, then ./workspace."""
    chosen = home or os.environ.get("RSIR_HOME") or "workspace"
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


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, home: str | os.PathLike | None = None) -> "Workspace":
        root = resolve_home(home)
        check_directory(root)
        return cls(root)

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def staging(self) -> Path:
        # Outside every dataset root: a leftover staging folder never shows up in a scan.
        return self.root / "staging"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def runs(self) -> Path:
        """Intermediate artifacts of generation runs (rollouts, accepted sequences)."""
        return self.root / "runs"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"
