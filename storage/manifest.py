"""The manifest: the single commit point of a dataset version.

Version k is the union of the partitions it lists (iterations j <= k). A version exists
exactly when its manifest file exists; data files that no manifest names are invisible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    computed_field,
    model_serializer,
    model_validator,
)

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


class Record(BaseModel):
    """A typed record of a manifest. A field is written only when it was given (read from the file
    or set by the step that made it), so a manifest written before a field existed is written back
    as it was, and the JSON of a new manifest is what the dict it replaces gave."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        given = self.model_fields_set | set(self.model_extra or {}) | set(type(self).model_computed_fields)
        return {k: v for k, v in out.items() if k in given}


class FilterParams(Record):
    """How a generation was filtered: fidelity is on exactly when `tau` is set (a rank threshold
    no looser than the generation's), and sequences shorter than `min_len` items are dropped."""

    tau: int | None = Field(description="rank threshold of the fidelity check; None = fidelity off")
    min_len: int = Field(description="shortest synthetic sequence kept (items)")

    @model_validator(mode="before")
    @classmethod
    def _old_shape(cls, data: Any) -> Any:
        # Manifests and file metadata spell out `fidelity` beside tau (always tau is not None).
        if isinstance(data, dict) and "fidelity" in data:
            data = {k: v for k, v in data.items() if k != "fidelity"}
        return data

    @computed_field  # written as before: {"tau", "min_len", "fidelity"}
    @property
    def fidelity(self) -> bool:
        return self.tau is not None


class FilterCounts(Record):
    """What the filter did to one generation: generated = too_short + duplicate_of_existing +
    duplicate_in_batch + accepted; `cut_by_tau` (rollouts ending at a failed fidelity check) or,
    for extensions, `rejected` (no held-out item reached)."""

    generated: int
    cut_by_tau: int | None = None
    rejected: int | None = None
    too_short: int
    duplicate_in_batch: int
    duplicate_of_existing: int
    accepted: int
    acceptance_rate: float = Field(description="accepted / generated (0 when nothing was generated)")
    mean_accepted_length: float = Field(0.0, description="mean items of an accepted sequence (0 when none)")


class GeneratorRef(Record):
    """The generator whose weights made a version: its backbone and the run's copy of its checkpoint."""

    backbone: str | None = None
    checkpoint: str | None = None


class GenerationRecord(Record):
    """What produced a version from its parent: the stored generation (its content `key`), the
    generator, the generation parameters (tasks/config.py GenerationParams, as JSON: storage
    knows no generator) and the filter. Every field but `key` may be missing from a manifest
    written by older code; other keys such a manifest holds are kept as they are."""

    model_config = ConfigDict(extra="allow")

    key: str | None = Field(None, description="generation key:filter parameters; a retried expansion with the "
                            "same key finds the committed version")
    parent_digest: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    mode: str | None = None
    params: dict[str, Any] | None = None
    filter: FilterParams | None = None
    generator: GeneratorRef | None = None


# Names of a version's statistics that older code wrote twice (flat, and inside filter_counts):
# read from filter_counts, written flat under these names (also the MLflow metrics data/<name>).
_FLAT_FILTER_NAMES = {"acceptance_rate": "acceptance_rate", "accepted": "accepted", "generated": "generated",
                      "mean_new_length": "mean_accepted_length"}


class VersionStats(Record):
    """A version's statistics (tasks/statistics.py version_statistics) and, for an expansion,
    what its generation and filter did. One attribute per quantity: the acceptance rate is
    `filter_counts.acceptance_rate`; the file (and MLflow's data/* metrics) also names four of
    the filter's counts flat, written from `filter_counts` (`_FLAT_FILTER_NAMES`), never read back."""

    model_config = ConfigDict(extra="allow")  # statistics of older or other writers

    sequences: int | None = None
    real_sequences: int | None = None
    synthetic_sequences: int | None = None
    interactions: int | None = None
    synthetic_interactions: int | None = None
    mean_length: float | None = None
    mean_synthetic_length: float | None = None
    num_items: int | None = None
    density: float | None = None
    pair_density: float | None = None
    item_entropy: float | None = None
    item_entropy_normalised: float | None = None
    item_gini: float | None = None
    apen_real: float | None = None
    apen_synthetic: float | None = None
    duplicates_removed: int | None = Field(None, description="import: duplicate events removed")
    filter_counts: FilterCounts | None = Field(None, description="expansion: the filter's counts")
    stop_reasons: dict[str, int] | None = Field(None, description="expansion: rollouts per stop reason")
    generation_seconds: float | None = Field(None, description="expansion: seconds the generation took")

    @model_validator(mode="before")
    @classmethod
    def _old_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and "filter_counts" in data:
            data = {k: v for k, v in data.items() if k not in _FLAT_FILTER_NAMES}
        return data

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        given = self.model_fields_set | set(self.model_extra or {})
        flat: dict[str, Any] = {}
        for key, value in out.items():
            if key == "filter_counts" and value is not None:
                flat.update({name: value[field] for name, field in _FLAT_FILTER_NAMES.items()})
            if key in given:
                flat[key] = value
        return flat

    def metrics(self) -> dict[str, float]:
        """The numeric statistics under their file names (MLflow's data/<name> metrics)."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, (int, float))}


@dataclass(frozen=True)
class VersionRef:
    """What tasks pass around for a dataset version: its name, number and content digest, and
    the statistics its manifest records (no data)."""

    dataset: str
    version: int
    digest: str
    parent_version: int | None = None
    stats: VersionStats | None = None


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
    generation: GenerationRecord | None = Field(None, description="parameters and checkpoint that produced this version")
    stats: VersionStats = Field(default_factory=VersionStats)

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
