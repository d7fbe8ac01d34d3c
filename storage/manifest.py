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


@dataclass(frozen=True)
class ItemTable:
    """What a model's item ids refer to: the item table of a dataset version, `num_items` items
    with ids 1..num_items, identified by `digest`, the SHA-256 of their raw ids in id order
    (storage.dataset.items_digest; 64 hex digits). A checkpoint records the digest of the table
    it was trained on and is applied only to a dataset with the same one."""

    dataset: str
    version: int
    num_items: int
    digest: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = MANIFEST_FORMAT
    dataset: str
    version: int
    parent_version: int | None
    lineage: int = Field(0, ge=0, description="0 for the first import, one more per replacement (--force)")
    num_items: int
    items: FileEntry
    items_digest: str | None = Field(
        None, description="identity of the item table: SHA-256 of the raw item ids in internal order (item "
        "1, 2, ..., N), the same in every version, fork and expansion of one import; None in manifests "
        "written before it was recorded (DatasetStore.item_table then computes it from the item file)")
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
