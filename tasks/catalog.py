"""The built-in datasets by name: MovieLens-100K, its built-in views and the RSIR paper's four
benchmark files, each fixed by its SHA-256. Apart from tasks/builtin.py (which fetches them and
declares a Prefect task) because the CLI checks a dataset's name before anything imports
Prefect: Prefect creates its home folder when first imported, and a mistyped name must write
nothing (rsir/cli.py `_require_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from core.errors import RsirError
from tasks.views import View, last_view, sparse_view


@dataclass(frozen=True)
class BenchmarkFile:
    """One of the RSIR paper's benchmark datasets: a `sequences` file of the S3-Rec repository
    (5-core, each user's items in time order), fixed by its SHA-256."""

    file: str
    sha256: str


BENCHMARKS: dict[str, BenchmarkFile] = {
    "amazon-beauty": BenchmarkFile("Beauty.txt", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
    "amazon-sports": BenchmarkFile("Sports_and_Outdoors.txt",
                                   "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2"),
    "amazon-toys": BenchmarkFile("Toys_and_Games.txt",
                                 "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f"),
    "yelp": BenchmarkFile("Yelp.txt", "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed"),
}
# Built-in views: name -> (source dataset, view).
BUILTIN_VIEWS: dict[str, tuple[str, Callable[[], View]]] = {
    "ml-100k-sparse": ("ml-100k", sparse_view),
    "ml-100k-last50": ("ml-100k", partial(last_view, 50)),
}
# ml-100k, the built-in views of it and the benchmarks.
BUILTIN = ("ml-100k", *BUILTIN_VIEWS, *BENCHMARKS)


def check_builtin(name: str) -> None:
    """A name `rsir data fetch` can build, else one line listing those it can."""
    if name not in BUILTIN:
        raise RsirError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN)}")
