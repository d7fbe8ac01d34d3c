"""The manifest: the single commit point of a dataset version.

Version k is the union of the partitions it lists (iterations j <= k). A version exists
exactly when its manifest file exists; data files that no manifest names are invisible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = 1


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the dataset root")
    rows: int
    bytes: int
    sha256: str


class PartitionEntry(FileEntry):
    iteration: int
    bucket: int


@dataclass(frozen=True)
class VersionRef:
    """What tasks pass around for a dataset version: its name, number and content digest, and
    the statistics its manifest records (no data)."""

    dataset: str
    version: int
    digest: str
    parent_version: int | None = None
    stats: dict[str, Any] | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = MANIFEST_FORMAT
    dataset: str
    version: int
    parent_version: int | None
    lineage: int = Field(0, ge=0, description="0 for the first import, one more per replacement (--force)")
    num_items: int
    items: FileEntry
    partitions: list[PartitionEntry]
    digest: str = Field(description="content digest chained over versions: parent digest + new partitions")
    created_at: str
    source: dict[str, Any] = Field(default_factory=dict, description="how version 0 was built")
    generation: dict[str, Any] | None = Field(None, description="parameters and checkpoint that produced this version")
    stats: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return sum(p.rows for p in self.partitions)

    def ref(self) -> VersionRef:
        return VersionRef(self.dataset, self.version, self.digest, self.parent_version, self.stats)

    @property
    def files(self) -> list[FileEntry]:
        """Every file of the version: the item table, then the partitions."""
        return [self.items, *self.partitions]


def chain_digest(parent_digest: str, partition_digests: list[str]) -> str:
    h = hashlib.sha256(parent_digest.encode())
    for d in partition_digests:
        h.update(d.encode())
    return h.hexdigest()
