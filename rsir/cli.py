"""`rsir`: the command-line front door. Every command that reports results accepts --json
and then prints exactly one JSON object on stdout (progress and logs go to stderr)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rsir.errors import RsirError

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Fetch, import and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

Home = Annotated[Optional[Path], typer.Option("--home", help="workspace directory (default $RSIR_HOME or ./workspace)")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


def _workspace(home: Path | None):
    from rsir.workspace import Workspace

    return Workspace.at(home)


def _emit(obj: dict[str, Any], as_json: bool, render) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        render(obj)


# ------------------------------------------------------------------ data
@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="built-in dataset: ml-100k or ml-100k-sparse")],
    force: Annotated[bool, typer.Option("--force", help="rebuild even if it exists")] = False,
    home: Home = None, as_json: Json = False,
) -> None:
    """Download a built-in dataset and build its version 0 (D_0)."""
    from tasks.ingest import fetch_builtin

    result = fetch_builtin(_workspace(home), name, replace=force)
    _emit(result, as_json, _render_ingest)


@data_app.command("import")
def data_import(
    path: Annotated[Path, typer.Argument(help="interaction file")],
    name: Annotated[str, typer.Option("--name", help="dataset name in the workspace")],
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet, recbole or amazon")],
    user_col: Annotated[str, typer.Option(help="user column (csv, parquet, recbole)")] = "user_id",
    item_col: Annotated[str, typer.Option(help="item column (csv, parquet, recbole)")] = "item_id",
    time_col: Annotated[str, typer.Option(help="timestamp column (csv, parquet, recbole)")] = "timestamp",
    sep: Annotated[Optional[str], typer.Option(help="field separator (default ',' or tab for recbole)")] = None,
    id_type: Annotated[Optional[str], typer.Option(help="int or str ids (default str for amazon, else int)")] = None,
    kcore: Annotated[Optional[int], typer.Option(help="k-core filter (default 5 for amazon, else off)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset")] = False,
    home: Home = None, as_json: Json = False,
) -> None:
    """Import your own interactions (user, item, timestamp) as a new dataset."""
    from rsir.config import parse_config
    from tasks.ingest import FORMATS, ImportSpec, import_dataset

    if fmt not in FORMATS:
        raise RsirError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = parse_config(ImportSpec, dict(path=path, name=name, format=fmt, user_col=user_col, item_col=item_col,
                                         time_col=time_col, sep=sep, id_type=id_type, kcore=kcore))
    result = import_dataset(_workspace(home), spec, replace=force)
    _emit(result, as_json, _render_ingest)


@data_app.command("list")
def data_list(home: Home = None, as_json: Json = False) -> None:
    """List datasets in the workspace with their latest version."""
    from tasks.ingest import dataset_store

    store = dataset_store(_workspace(home))
    rows = []
    for name in store.names():
        m = store.manifest(name)
        rows.append({"dataset": name, "version": m.version, "digest": m.digest, **m.stats})
    _emit({"datasets": rows}, as_json, _render_list)


def _render_ingest(r: dict[str, Any]) -> None:
    s = r.get("stats", {})
    status = " (already present)" if r.get("status") == "exists" else ""
    print(f"dataset {r['dataset']} v{r['version']}{status}  digest {r['digest'][:12]}")
    print(f"  users {r.get('users', s.get('real_sequences'))}  items {r.get('items', s.get('num_items'))}  "
          f"interactions {s.get('interactions')}  mean length {s.get('mean_length')}  density {s.get('density', 0):.5f}")
    if "dropped_short_users" in r:
        print(f"  dropped: {r['dropped_short_users']} users with fewer than 3 interactions, "
              f"{r.get('kcore_removed_interactions', 0)} interactions by the {r.get('kcore', 0)}-core filter")


def _render_list(r: dict[str, Any]) -> None:
    if not r["datasets"]:
        print("no datasets; try `rsir data fetch ml-100k`")
    for d in r["datasets"]:
        print(f"{d['dataset']:<24} v{d['version']:<3} sequences {d.get('sequences'):<7} "
              f"interactions {d.get('interactions'):<8} density {d.get('density', 0):.5f}")


# ------------------------------------------------------------------ train / evaluate
@app.command("train")
def train(
    dataset: Annotated[str, typer.Option(help="dataset name")] = "ml-100k",
    model: Annotated[str, typer.Option(help="backbone name")] = "sasrec",
    version: Annotated[Optional[int], typer.Option(help="dataset version (default: latest)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    epochs: Annotated[Optional[int], typer.Option(help="maximum epochs")] = None,
    patience: Annotated[Optional[int], typer.Option(help="early-stopping patience (epochs)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="training batch size")] = None,
    max_len: Annotated[Optional[int], typer.Option(help="maximum sequence length")] = None,
    hidden: Annotated[Optional[int], typer.Option(help="hidden size")] = None,
    layers: Annotated[Optional[int], typer.Option(help="number of blocks")] = None,
    heads: Annotated[Optional[int], typer.Option(help="attention heads")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="dropout in [0, 1)")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce, sampled or bce")] = None,
    negatives: Annotated[Optional[int], typer.Option(help="negatives for loss=sampled")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="backbone option KEY=VALUE (repeatable)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    include_history: Annotated[bool, typer.Option("--include-history", help="rank the user's own history items too")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="where to write the checkpoint")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="progress bars on stderr")] = None,
    home: Home = None, as_json: Json = False,
) -> None:
    """Train a backbone from scratch on a dataset version and evaluate it (leave-one-out, full ranking)."""
    from rsir.config import TrainConfig, parse_config

    model_params = _drop_none(name=model, max_len=max_len, hidden=hidden, layers=layers, heads=heads,
                              dropout=dropout, loss=loss, negatives=negatives, options=_options(option))
    params = _drop_none(dataset=dataset, version=version, seed=seed, epochs=epochs, patience=patience, lr=lr,
                        batch_size=batch_size, device=device, threads=threads, model=model_params,
                        exclude_history=not include_history,
                        progress=sys.stderr.isatty() if progress is None else progress)
    cfg = parse_config(TrainConfig, params)
    from tasks.train import train_model

    result = train_model(cfg, _workspace(home), checkpoint=checkpoint).to_dict()
    result.pop("curve")
    result["model"] = cfg.model.name
    result["seed"] = cfg.seed
    _emit(result, as_json, _render_train)


@app.command("evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint file written by `rsir train`")],
    dataset: Annotated[str, typer.Option(help="dataset name")] = "ml-100k",
    version: Annotated[Optional[int], typer.Option(help="dataset version (default: latest)")] = None,
    include_history: Annotated[bool, typer.Option("--include-history", help="rank the user's own history items too")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    home: Home = None, as_json: Json = False,
) -> None:
    """Evaluate a stored checkpoint on a dataset version (validation and test)."""
    from tasks.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(_workspace(home), checkpoint, dataset, version,
                                 exclude_history=not include_history, device=device)
    _emit(result, as_json, _render_eval)


def _options(pairs: list[str] | None) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RsirError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _metric_table(valid: dict[str, float], test: dict[str, float]) -> None:
    print(f"  {'metric':<10} {'valid':>8} {'test':>8}")
    for key in valid:
        print(f"  {key:<10} {valid[key]:>8.4f} {test[key]:>8.4f}")


def _render_train(r: dict[str, Any]) -> None:
    print(f"{r['model']} on {r['dataset']} v{r['version']} (digest {r['digest'][:12]}), seed {r['seed']}, "
          f"device {r['device']}")
    _metric_table(r["valid"], r["test"])
    print(f"  epochs {r['epochs']}  best epoch {r['best_epoch']}  {r['seconds_per_epoch']:.2f} s/epoch  "
          f"total {r['seconds_total']:.1f} s")
    print(f"  checkpoint {r['checkpoint']}")


def _render_eval(r: dict[str, Any]) -> None:
    print(f"{r['model']} checkpoint on {r['dataset']} v{r['version']}")
    _metric_table(r["valid"], r["test"])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        app(args=argv)
    except RsirError as exc:
        print(f"rsir: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
