"""The workspace: the one directory that holds all state (datasets, checkpoints, MLflow)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """--home wins, then $RSIR_HOME, then ./workspace."""
    chosen = home or os.environ.get("RSIR_HOME") or "workspace"
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, home: str | os.PathLike | None = None) -> "Workspace":
        return cls(resolve_home(home))

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
