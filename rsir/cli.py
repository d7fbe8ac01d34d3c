"""`rsir`: the command-line front door. Every command that reports results accepts --json
and then prints exactly one JSON object on stdout (progress and logs go to stderr)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Union, get_args, get_origin

import typer
from typer.core import TyperCommand

from core.config import DEVICES, ConfigError, Parameter, bare, parse_config, with_parameters
from core.errors import RsirError
from core.hashing import short_digest

# What an option's value is called in the help, by its type: Typer would show the Python type
# (`<int>`, `<list[str]>`); a repeatable option is called by its element, a switch takes none.
_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOLEAN"}


def _metavar(annotation: Any) -> str:
    """The help's name for a value of `annotation` (an option's type, None allowed): INTEGER,
    FLOAT, TEXT, PATH; a list's element's (the option repeats); a literal's or a union's
    members (`INTEGER|auto`)."""
    base = _without_none(annotation)
    if get_origin(base) is list:
        base = _without_none(get_args(base)[0])
    if get_origin(base) is Literal:
        return "|".join(map(str, get_args(base)))
    if get_origin(base) in (Union, UnionType):
        return "|".join(_metavar(a) for a in get_args(base))
    if get_origin(base) is dict:
        return "KEY=VALUE"
    return _METAVARS.get(base, "TEXT")


class _Command(TyperCommand):
    """Every `rsir` command: its options that declare no metavar get `_metavar`'s (a switch
    none), the help option too; a value its typed config refused (`_given_as_options`) is named
    as the option the user typed."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            descriptor = getattr(param, "type_descriptor", None)
            if param.param_type_name == "option" and param.metavar is None:
                param.metavar = "" if param.is_flag else \
                    _metavar(descriptor.annotation) if descriptor is not None else param.type.name.upper()
            elif param.param_type_name == "argument" and descriptor is not None:
                # An argument's metavar would rename it (the usage's {suite}): only its type column.
                param.display_type_rich = lambda ctx=None, shown=_metavar(descriptor.annotation): shown
        return params

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _OptionRefused as exc:
            raise RsirError(_option_line(exc.refused, ctx)) from None


class _OptionRefused(RsirError):
    """A command's own typed config refused what its options gave (`_given_as_options`)."""

    def __init__(self, refused: ConfigError):
        super().__init__(str(refused))
        self.refused = refused


@contextlib.contextmanager
def _given_as_options(aliases: dict[tuple[str, ...], str] | None = None):
    """Around a command's parse of its options into its typed config: a refused value is named
    by the option the user gave (`--seed -1: ...`) instead of its path in the config
    (`seeds.0`), which flows and API callers keep. Only here: a config parsed later (inside a
    flow) holds values the user may have given otherwise. `aliases`: where the command folded an
    option of its own into another parameter (`rsir run --option K=V` into model_params.options.K,
    `rsir train --positions` into options.positions), that parameter's path -> the option as typed,
    which then names a refusal at or under that path."""
    try:
        yield
    except ConfigError as exc:
        path = (exc.parameter, *map(str, exc.key))
        typed = next((flag for where, flag in (aliases or {}).items() if path[:len(where)] == where), None)
        if typed is not None:
            raise RsirError(f"{typed}: {exc.reason}") from None
        raise _OptionRefused(exc) from None


def _option_line(exc: ConfigError, ctx: Any) -> str:
    """The one line of a refused value as the user gave it: `--seed -1: <why>` (a repeated
    option's refused element), `--model-params loss=x: <why>` (a KEY=VALUE pair), `--tau 1..x:
    <why>` (what the option was given); the config's own line where no option carried it."""
    if exc.parameter is None:
        return str(exc)
    flag = "--" + exc.parameter.replace("_", "-")
    params = ctx.command.params
    given = next((p for p in params if p.name == exc.parameter), None) or \
        next((p for p in params if flag in getattr(p, "opts", ())), None)  # a config field's flag, by name
    if given is None:
        return str(exc)
    name = given.opts[0] if given.param_type_name == "option" else (given.metavar or given.name).upper()
    key = [str(k) for k in exc.key if not isinstance(k, int)]
    scalar = isinstance(exc.value, (str, int, float, bool))
    if getattr(given, "multiple", False):  # KEY=VALUE pairs or a list: the pair, the element refused
        shown = f"{'.'.join(key)}={_shown(exc.value)}" if key and scalar else _shown(exc.value) if scalar else ""
    else:
        raw = ctx.params.get(given.name)
        shown = _shown(raw) if isinstance(raw, (str, int, float, bool)) else _shown(exc.value) if scalar else ""
    return f"{name}{' ' + shown if shown else ''}: {exc.reason}"


def _shown(value: Any) -> str:
    """A value as typed on the command line (quoted where a shell would need it)."""
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


class _Typer(typer.Typer):
    """A Typer app whose commands are `_Command`s."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = _Typer(help="Fetch, import and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

Home = Annotated[Optional[str], typer.Option("--home", help="workspace: a directory or an fsspec URL such as s3://bucket/prefix (default $RSIR_HOME or ./workspace)")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


def _workspace(home: str | None):
    from core.workspace import Workspace

    return Workspace.at(home)


def _location(value: str | None):
    from storage.files import location

    return None if value is None else location(value)


def _local_prefect(ws):
    """Prefect's home (its profiles, its temporary server's database, results) is the workspace's
    `prefect` folder unless PREFECT_HOME is set (the user's own wins). Call before anything imports
    Prefect (the flows, and the tasks modules, which declare Prefect tasks), and only once the
    command's input is checked: Prefect reads its settings once, when first imported, and creates
    its home then, so an import before this created `~/.prefect` in the user's home, and an import
    before the checks would leave a folder in the workspace of a refused command. The folder is
    made here, parents too: Prefect's import makes only the last level (a new workspace would get
    a warning) and its server would fail to create its database."""
    os.environ.setdefault("PREFECT_HOME", str(ws.root / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's own temporary server (where rsir does not start one) gets more than its 20 s: the
    # first start migrates a new database, which took longer on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return ws


def _before_flow(ws, tracking_uri: str | None, datasets: list[str], check: Callable[[], Any] | None = None) -> None:
    """Before a flow starts: the environment it will use, its datasets and then the command's own
    `check` checked (one line, no work done, Prefect not imported: a refused command leaves no
    Prefect home), then Prefect's home set (`_local_prefect`) and its failure tracebacks sent to
    the workspace's log instead of the terminal, where the failure is the one line `main` prints.
    The environment first: the dataset check reads the workspace."""
    from flows.boundary import check_environment, quiet_engine_failures

    check_environment(ws, tracking_uri, prefect=True)
    for name in datasets:
        _require_dataset(ws, name)
    if check is not None:
        check()
    _local_prefect(ws)
    quiet_engine_failures(ws)


def _emit(obj: Any, as_json: bool, render) -> None:
    """Print a result (a dict or a typed result) as one JSON object or rendered for people."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    obj = _plain(obj)
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        render(obj)


def _plain(obj: Any) -> Any:
    """A result with its typed records (pydantic models) as the dicts they serialize to."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        return obj.model_dump()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ data
@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="built-in dataset: ml-100k, ml-100k-sparse, ml-100k-last50, "
                                        "amazon-beauty, amazon-sports, amazon-toys or yelp")],
    mirror: Annotated[Optional[Path], typer.Option(
        "--from", help="local directory with the benchmark files (Beauty.txt, ...); default $RSIR_DATA_MIRROR, "
                       "else download from aHuiWang/CIKM2020-S3Rec")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if it exists")] = False,
    home: Home = None, as_json: Json = False,
) -> None:
    """Download a built-in dataset and build its version 0 (D_0)."""
    from tasks.catalog import check_builtin

    check_builtin(name)
    ws = _local_prefect(_workspace(home))
    from tasks.builtin import fetch_builtin

    result = fetch_builtin(ws, name, replace=force, mirror=mirror)
    _emit(result, as_json, _render_ingest)


@data_app.command("import")
def data_import(
    path: Annotated[Path, typer.Argument(help="interaction file")],
    name: Annotated[str, typer.Option("--name", help="dataset name in the workspace")],
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet, recbole, amazon or sequences")],
    user_col: Annotated[str, typer.Option(help="user column (csv, parquet, recbole)")] = "user_id",
    item_col: Annotated[str, typer.Option(help="item column (csv, parquet, recbole)")] = "item_id",
    time_col: Annotated[Optional[str], typer.Option(help="timestamp column (csv, parquet, recbole; default "
                                                    "'timestamp')")] = None,
    no_time: Annotated[bool, typer.Option("--no-time", help="the file has no time column: the row order "
                                          "within a user is the time order")] = False,
    sep: Annotated[Optional[str], typer.Option(help="field separator (default ',' or tab for recbole)")] = None,
    id_type: Annotated[Optional[str], typer.Option(help="int or str ids (default str for amazon, else int)")] = None,
    kcore: Annotated[Optional[int], typer.Option(help="k-core filter (default 5 for amazon, else off)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset")] = False,
    home: Home = None, as_json: Json = False,
) -> None:
    """Import your own interactions (user, item, timestamp) as a new dataset."""
    from tasks.ingest import FORMATS, ImportSpec, import_dataset

    if fmt not in FORMATS:
        raise RsirError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if no_time and time_col is not None:
        raise RsirError(f"--no-time and --time-col {time_col!r} contradict each other; give one")
    # Only what was given: ImportSpec holds the defaults (time_col None there = no time column).
    times = {"time_col": None} if no_time else {} if time_col is None else {"time_col": time_col}
    with _given_as_options():
        spec = parse_config(ImportSpec, dict(path=path, name=name, format=fmt, user_col=user_col, item_col=item_col,
                                             sep=sep, id_type=id_type, kcore=kcore, **times))
    result = import_dataset(_workspace(home), spec, replace=force)
    _emit(result, as_json, _render_ingest)


@data_app.command("view")
def data_view(
    source: Annotated[str, typer.Argument(help="dataset to derive from (its version 0, real sequences)")],
    name: Annotated[str, typer.Option("--name", help="name of the new dataset")],
    last: Annotated[int, typer.Option("--last", help="keep each user's newest N interactions (N >= 3)")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset")] = False,
    home: Home = None, as_json: Json = False,
) -> None:
    """Derive a history-window view: a new dataset with each user's newest N interactions."""
    from tasks.views import derive_view, last_view

    view = last_view(last)  # validates N before the workspace is touched
    result = derive_view(_workspace(home), source, name, view, replace=force)
    _emit(result, as_json, _render_ingest)


@data_app.command("list")
def data_list(home: Home = None, as_json: Json = False) -> None:
    """List datasets in the workspace with their latest version."""
    from storage.dataset import dataset_store

    store = dataset_store(_workspace(home))
    _emit({"datasets": [_list_row(store, name) for name in store.names()]}, as_json, _render_list)


def _list_row(store, name: str) -> dict[str, Any]:
    """One dataset's latest version; a dataset that cannot be read gets an "error" entry, so one
    corrupt manifest does not hide the others."""
    try:
        m = store.manifest(name)
    except RsirError as exc:
        return {"dataset": name, "error": str(exc)}
    return {"dataset": name, "version": m.version, "digest": m.digest, **m.stats.model_dump()}


def _render_ingest(r: dict[str, Any]) -> None:
    s = r.get("stats", {})
    status = " (already present)" if r.get("status") == "exists" else ""
    print(f"dataset {r['dataset']} v{r['version']}{status}  digest {short_digest(r['digest'])}")
    print(f"  users {r.get('users', s.get('real_sequences'))}  items {r.get('items', s.get('num_items'))}  "
          f"interactions {s.get('interactions')}  mean length {_opt(s.get('mean_length'), 2)}  "
          f"density {s.get('density', 0):.5f}")
    if "derived_from" in r:
        print(f"  view of {r['derived_from']}: {_describe_view(r['view'])}")
    if "dropped_short_users" in r:
        print(f"  dropped: {r.get('duplicates_removed', 0)} duplicate events (same user, item and time), "
              f"{r['dropped_short_users']} users with fewer than 3 interactions, "
              f"{r.get('kcore_removed_interactions', 0)} interactions by the {r.get('kcore', 0)}-core filter")


def _describe_view(view: dict[str, Any]) -> str:
    if view.get("rule") == "last":
        return f"each user's newest {view['n']} interactions"
    return view.get("description", str(view))


def _render_list(r: dict[str, Any]) -> None:
    if not r["datasets"]:
        print("no datasets; try `rsir data fetch ml-100k`")
    width = max((len(d["dataset"]) for d in r["datasets"]), default=0)  # forks: <name>--<lineage key>
    for d in r["datasets"]:
        if "error" in d:
            print(f"{d['dataset']:<{width}}  error: {d['error']}")
            continue
        print(f"{d['dataset']:<{width}}  v{d['version']:<3} sequences {d.get('sequences'):>7}  "
              f"interactions {d.get('interactions'):>8}  density {d.get('density', 0):.5f}")


# ------------------------------------------------------------------ options derived from the configs
# A command's options are the flat parameters of its typed config (core/config.py Parameter),
# turned into Typer options here, once: a parameter `some_name` is the option --some-name (K also
# -K); a dict parameter is given as repeatable KEY=VALUE pairs (dotted keys nest), a bool as
# --name/--no-name, a literal as one of its values (listed in the help).
def _as_option(p: Parameter, flag: str | None = None) -> Parameter:
    """The command-line option of a flat parameter: `--some-name` for `some_name` unless `flag`
    names it (K also -K; a bool's flag may name both switches, `--on/--off`). A bool left None
    (the recipe's) stays None unless a switch is given."""
    base = _without_none(p.annotation)
    flag = flag or "--" + p.name.replace("_", "-")
    decls = ("-K", "--K") if p.name == "K" else (flag,)
    metavar = _metavar(base)  # the value's name in the help: INTEGER, TEXT, a list's element's...
    if base is bool:
        switches = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
        return Parameter(p.name, Annotated[Optional[bool] if p.default is None else bool,
                                           typer.Option(switches, help=p.help, metavar="")], p.default, "")
    if get_origin(base) is dict:
        help_ = f"{p.help}; {_repeatable(p.help, 'KEY=VALUE, repeatable, dotted keys nest')}"
        return Parameter(p.name, Annotated[Optional[list[str]], typer.Option(*decls, help=help_, metavar=metavar)],
                         None, "")
    if get_origin(base) in (Union, UnionType) or get_origin(base) is Literal:
        # a number or a word (K: 3 or auto), one of some words: text, the config parses it
        help_ = f"{p.help} ({metavar.replace('|', ' | ')})"
        return Parameter(p.name, Annotated[Optional[str] if p.default is None else str,
                                           typer.Option(*decls, help=help_, metavar="TEXT")], p.default, "")
    kind = Optional[base] if p.default is None else base
    repeatable = get_origin(base) is list and "repeatable" not in p.help  # a field may say so itself
    help_ = f"{p.help} (repeatable)" if repeatable else p.help
    return Parameter(p.name, Annotated[kind, typer.Option(*decls, help=help_, metavar=metavar)], p.default, "")


def _repeatable(help_: str, said: str) -> str:
    """`said` (which says the option repeats) unless the help says so already."""
    return said.replace("repeatable, ", "") if "repeatable" in help_ else said


def _without_none(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation


# ------------------------------------------------------------------ train / evaluate
# `rsir train`'s options are one training's flat parameters (tasks/config.py train_parameters:
# TrainConfig's fields, the backbone's ModelConfig settings flat), derived as `rsir run`'s are.
# Four keep the spellings they had: --option KEY=VALUE (a backbone option, repeatable),
# --negatives-exclude-input/--negatives-any, --include-history (the switch off of
# --exclude-history) and --progress/--no-progress, whose default is the terminal's (bars when
# stderr is one). --positions is SASRec's `positions` option by name; --checkpoint names the file.
_TRAIN_FLAGS = {"options": "--option", "negatives_exclude_input": "--negatives-exclude-input/--negatives-any",
                "exclude_history": "--exclude-history/--include-history"}


def _train_options() -> list[Parameter]:
    from tasks.config import train_parameters

    out = []
    for p in train_parameters():
        if p.name == "progress":  # unset: bars when stderr is a terminal
            p = Parameter(p.name, Optional[bool], None, f"{p.help} (default: when stderr is a terminal)")
        out.append(_as_option(p, _TRAIN_FLAGS.get(p.name)))
        if p.name == "options":
            out.append(Parameter("positions", Annotated[Optional[str], typer.Option(
                help="newest or oldest: where positions are counted from (the option positions=...)")], None, ""))
    return out + [
        Parameter("checkpoint", Annotated[Optional[str], typer.Option(
            help="where to write the checkpoint (a path or a URL)")], None, ""),
        Parameter("home", Home, None, ""), Parameter("as_json", Json, False, "")]


def train(**params: Any) -> None:
    """Train a backbone from scratch on a dataset version and evaluate it (leave-one-out, full ranking)."""
    from tasks.config import TrainConfig
    from tasks.executor import LOCAL, Executor

    home, as_json, checkpoint = params.pop("home"), params.pop("as_json"), params.pop("checkpoint")
    positions = params.pop("positions")
    given = _nested_pairs(params["options"], "--option") or {}
    if positions is not None and given.get("positions", positions) != positions:
        raise RsirError(f"--positions {positions} and --option positions={given['positions']} disagree; give one")
    options = {**given, **_drop_none(positions=positions)}
    params["options"] = options or None
    if params["progress"] is None:
        params["progress"] = sys.stderr.isatty()
    typed = {} if positions is None or "positions" in given else {("options", "positions"): f"--positions {positions}"}
    with _given_as_options(typed):
        cfg = TrainConfig.from_parameters(params)  # a bad value: one line, before any data is read
    ws, started = _local_prefect(_workspace(home)), time.perf_counter()
    from tasks.train import train_model

    # More than one training process: data-parallel on Ray, a local cluster started on first use.
    executor = Executor(kind="ray") if cfg.train_workers > 1 else LOCAL
    with _interrupts() as received:
        try:
            result = train_model(cfg, ws, checkpoint=_location(checkpoint), executor=executor).to_dict()
        except KeyboardInterrupt:
            signum = received[0] if received else signal.SIGINT
            print(_train_interrupted(cfg, ws, signum, time.perf_counter() - started), file=sys.stderr)
            sys.exit(128 + signum)
    result.pop("curve")
    result["model"] = cfg.model.name
    result["seed"] = cfg.seed
    _emit(result, as_json, _render_train)


def _train_interrupted(cfg, ws, signum: int, seconds: float) -> str:
    """The one line of an interrupted `rsir train`: where its saved state stands and how to resume."""
    from tasks.train import ResumePoint

    try:
        point = ResumePoint.of(cfg, ws) if cfg.train_workers == 1 else None
        epoch = point.saved_epoch() if point is not None else None
    except Exception:  # the line is what matters; an unreadable workspace says it elsewhere
        point = epoch = None
    where = (f"its state after epoch {epoch} is saved in {point.path}; run the same command again to resume from it"
             if epoch is not None else "no state was saved yet (every --resume-seconds); the same command starts over")
    return f"rsir: interrupted by {signal.Signals(signum).name} after {seconds:.1f} s; {where}"


app.command("train")(with_parameters(train, _train_options()))

def _threads_option() -> Parameter:
    """--threads of a command that runs torch outside `rsir train`, `run` and `experiment`
    (whose configs carry it): the one declaration, tasks/config.py CpuThreads."""
    from tasks.config import CpuThreads

    field = CpuThreads.model_fields["threads"]
    return _as_option(Parameter("threads", bare(field.annotation), field.default, field.description or ""))


@contextlib.contextmanager
def _on_threads(threads: int) -> Iterator[None]:
    """Run the command's torch work on `threads` CPU threads, checked first (one line, exit 2)."""
    from tasks.config import CpuThreads
    from tasks.runtime import torch_threads

    with _given_as_options():
        parse_config(CpuThreads, {"threads": threads})
    with torch_threads(threads):
        yield


def evaluate(**params: Any) -> None:
    """Evaluate a stored checkpoint on a dataset version (validation and test)."""
    with _on_threads(params["threads"]):
        ws = _local_prefect(_workspace(params["home"]))
        from tasks.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(ws, params["checkpoint"], params["dataset"], params["version"],
                                     exclude_history=not params["include_history"], device=params["device"])
    _emit(result, params["as_json"], _render_eval)


app.command("evaluate")(with_parameters(evaluate, [
    Parameter("checkpoint", Annotated[str, typer.Option(help="checkpoint written by `rsir train` (a path or a URL)")],
              inspect.Parameter.empty, ""),
    Parameter("dataset", Annotated[str, typer.Option(help="dataset name")], "ml-100k", ""),
    Parameter("version", Annotated[Optional[int], typer.Option(help="dataset version (default: latest)")], None, ""),
    Parameter("include_history", Annotated[bool, typer.Option(
        "--include-history", help="rank the user's own history items too")], False, ""),
    Parameter("device", Annotated[str, typer.Option(help=DEVICES)], "auto", ""),
    _threads_option(), Parameter("home", Home, None, ""), Parameter("as_json", Json, False, "")]))


def generate(**params: Any) -> None:
    """Generate with fidelity control, filter and expand: publish the dataset's next version."""
    from storage.dataset import dataset_store
    from storage.manifest import FilterParams
    from tasks.config import GenerationParams

    dataset, checkpoint, version = params.pop("dataset"), params.pop("checkpoint"), params.pop("version")
    mode, holdout_h, home, as_json = params.pop("mode"), params.pop("holdout_h"), params.pop("home"), params.pop("as_json")
    threads = params.pop("threads")
    if not params.pop("fidelity"):
        params["tau"] = None  # fidelity off: no rank threshold (GenerationParams' one encoding)
    with _given_as_options():
        params = parse_config(GenerationParams, params)
    ws = _workspace(home)
    parent = dataset_store(ws).manifest(dataset, version)
    if parent.version != dataset_store(ws).versions(dataset)[-1]:
        raise RsirError(f"dataset {dataset!r}: version {parent.version} is not the latest; expand the latest "
                        f"(versions are a chain) or fork the dataset")
    _local_prefect(ws)
    from tasks.expand import expand_step
    from tasks.filter import filter_step
    from tasks.generate import generate_step

    with _on_threads(threads):
        generated = generate_step(ws.home, dataset, parent.version, str(checkpoint), params, mode, holdout_h)
        accepted = filter_step(ws.home, dataset, parent.version, generated,
                               FilterParams(tau=params.tau, min_len=params.min_len))
        result = expand_step(ws.home, accepted)
    _emit(result, as_json, _render_version)


@app.command("versions")
def versions(
    dataset: Annotated[str, typer.Option(help="dataset name")],
    home: Home = None, as_json: Json = False,
) -> None:
    """List a dataset's versions with their statistics."""
    from storage.dataset import dataset_store

    store = dataset_store(_workspace(home))
    rows = []
    for v in store.versions(dataset) or [store.manifest(dataset).version]:
        m = store.manifest(dataset, v)
        rows.append({"version": v, "parent_version": m.parent_version, "digest": m.digest, "stats": m.stats,
                     "generation": m.generation})  # _emit writes the records as their JSON
    _emit({"dataset": dataset, "versions": rows}, as_json, _render_versions)


def _render_version(r: dict[str, Any]) -> None:
    s = r["stats"]
    print(f"dataset {r['dataset']} v{r['version']} (from v{r['parent_version']})  digest {short_digest(r['digest'])}")
    for key in ("sequences", "real_sequences", "synthetic_sequences", "interactions", "density", "pair_density",
                "item_entropy", "item_entropy_normalised", "item_gini", "apen_real", "apen_synthetic",
                "acceptance_rate", "mean_new_length", "mean_synthetic_length", "stop_reasons"):
        if key in s:
            value = s[key]
            print(f"  {key:<24} {value:.5f}" if isinstance(value, float) else f"  {key:<24} {value}")


def _render_versions(r: dict[str, Any]) -> None:
    print(f"{'v':>3} {'parent':>6} {'sequences':>9} {'synthetic':>9} {'interactions':>12} {'density':>8} "
          f"{'entropy':>7} {'gini':>5} {'accept':>6} {'new len':>7}  digest")
    for v in r["versions"]:
        s = v["stats"]
        parent = "-" if v["parent_version"] is None else v["parent_version"]
        print(f"{v['version']:>3} {parent:>6} {s.get('sequences', 0):>9} {s.get('synthetic_sequences', 0):>9} "
              f"{s.get('interactions', 0):>12} {s.get('density', 0):>8.5f} {s.get('item_entropy', 0):>7.3f} "
              f"{s.get('item_gini', 0):>5.3f} {_opt(s.get('acceptance_rate')):>6} {_opt(s.get('mean_new_length')):>7}"
              f"  {short_digest(v['digest'])}")


def _opt(value: Any, digits: int = 3) -> str:
    """A figure for people: `digits` decimals (the JSON keeps them all), '-' where there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


# `rsir run`'s options are the flow's parameters (tasks/config.py run_parameters), derived by
# `_as_option`. The CLI sets the workspace and progress bars itself.
_RUN_SET_BY_CLI = {"home", "progress"}


def _run_options() -> list[Parameter]:
    from tasks.config import run_parameters

    return [_as_option(p) for p in run_parameters() if p.name not in _RUN_SET_BY_CLI] + [
        Parameter("option", Annotated[Optional[list[str]], typer.Option(
            "--option", help="student backbone option KEY=VALUE (repeatable): model-params options.KEY=VALUE")],
            None, ""),
        Parameter("home", Home, None, ""), Parameter("as_json", Json, False, "")]


def _nested_pairs(pairs: list[str] | None, flag: str) -> dict[str, Any] | None:
    """['hidden=32', 'options.positions=newest'] -> {'hidden': 32, 'options': {'positions': 'newest'}}."""
    flat = _options(pairs, flag)
    if flat is None:
        return None
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *outer, last = key.split(".")
        node = out
        for part in outer:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RsirError(f"{flag}: {key!r} nests under a key that already has a value")
        node[last] = value
    return out


def run(**params: Any) -> None:
    """Run the RSIR flow from this process and print the per-iteration table (a temporary Prefect
    server in the workspace, stopped at the end, unless PREFECT_API_URL names one)."""
    from tasks.config import RunConfig, run_parameters

    home, as_json, option = params.pop("home"), params.pop("as_json"), params.pop("option")
    ws = _workspace(home)
    pairs = {p.name for p in run_parameters() if get_origin(_without_none(p.annotation)) is dict}
    for name, value in list(params.items()):
        if isinstance(value, list) and name in pairs:  # KEY=VALUE pairs; a list parameter stays a list
            params[name] = _nested_pairs(value, "--" + name.replace("_", "-"))
    if option:
        model_params = params.get("model_params") or {}
        if not isinstance(model_params.get("options", {}), dict):
            raise RsirError(f"--model-params options={model_params['options']}: options are KEY=VALUE pairs "
                            f"(--option KEY=VALUE or --model-params options.KEY=VALUE)")
        given = _options(option, "--option")
        params["model_params"] = {**model_params, "options": {**model_params.get("options", {}), **given}}
        typed = {("model_params", "options", key): f"--option {key}={value}" for key, value in given.items()}
    params.update(home=ws.home, progress=sys.stderr.isatty())
    with _given_as_options(typed if option else None):
        cfg = RunConfig.from_parameters(params)  # a bad value: one line, before Prefect is even imported
    _before_flow(ws, cfg.tracking_uri, [cfg.dataset])
    from flows.rsir import rsir

    started = time.perf_counter()
    summary, server_start = _run_flow(ws, lambda: rsir(**params), started, (cfg.tracking_uri, cfg.experiment))
    summary.update(command_seconds=time.perf_counter() - started, server_start_seconds=server_start)
    _emit(summary, as_json, lambda r: print(format_table(r)))


def _cell(column: str, value: Any) -> str:
    """A table cell: '-' for a value that does not apply (no generation after the last
    iteration), floats at one precision per column (density 5 decimals, the rest 4)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5f}" if column == "density" else f"{value:.4f}"
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The per-iteration table `rsir run` and `make run` print, from the run's summary (its JSON,
    tasks/runlog.py RunSummary). `command_seconds` and `server_start_seconds`, when `run` adds
    them, count the Prefect server's start too."""
    from tasks.runlog import RunSummary, champion_line, table_rows

    s = RunSummary.model_validate(summary)
    rows = table_rows(s.iterations)
    cols = list(rows[0])
    cells = [[_cell(c, r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    wall = f"wall {s.wall_seconds:.1f} s"
    if s.command_seconds is not None:
        wall = (f"wall {s.command_seconds:.1f} s (Prefect server start {s.server_start_seconds:.1f} s, "
                f"flow {s.wall_seconds:.1f} s)")
    lines.append(f"{wall}, steps {s.step_seconds:.1f} s, "
                 f"orchestration+tracking overhead {100 * s.overhead_fraction:.1f}% of the flow")
    lines.append(f"data: D_0..D_{s.K} in dataset {s.run_dataset}, this run's fork of "
                 f"{s.dataset} (`rsir versions --dataset {s.run_dataset}`)")
    if s.stopped:
        lines.append(f"stopped: {s.stopped}")
    lines.append(f"champion: {champion_line(s)}; MLflow run {s.mlflow_run_id} ({s.tracking_uri})")
    if s.mlflow_url:
        lines.append(f"lineage: {s.mlflow_url}")
    return "\n".join(lines)


def _require_dataset(ws, name: str) -> None:
    """A run's dataset must be in the workspace or built in (fetched by the run): checked before
    a Prefect server starts, so a mistyped name costs one line, not a server start and retries."""
    from storage.dataset import dataset_store
    from tasks.catalog import BUILTIN

    if name not in BUILTIN and not dataset_store(ws).versions(name):
        raise RsirError(f"dataset {name!r} is neither in the workspace {ws.home} (see `rsir data list`) nor "
                        f"built in ({', '.join(BUILTIN)})")


@contextlib.contextmanager
def _interrupts():
    """While the block runs, SIGTERM interrupts it as Ctrl-C (SIGINT) does: KeyboardInterrupt
    in the main thread. Yields the list of the signals received (Prefect's own SIGTERM handler,
    active inside a flow, raises its TerminationSignal and then signals again: this handler sees
    it then)."""
    from core import interrupts

    received: list[int] = []

    def interrupt(signum: int, _frame: object) -> None:
        received.append(signum)
        interrupts.note(signum)  # what ends a run reads it (core/interrupts.py stop_status)
        raise KeyboardInterrupt

    # A signal that lands while a finalizer or a weakref callback runs (the garbage collector
    # calls them at any bytecode) has its KeyboardInterrupt printed as "Exception ignored" and
    # dropped, and the command would run on: seen once under load (an `rsir tune` finished its
    # trial after Ctrl-C). Such a lost interrupt is delivered again, to the code that runs next:
    # from a timer thread, so that the handler does not run (and raise) inside this hook. The same
    # for Prefect's TerminationSignal (its SIGTERM handler, active inside a flow, replaces this
    # one): seen in CI, an `rsir tune` that finished its trial after SIGTERM.
    hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        lost = received[-1] if info.exc_type is KeyboardInterrupt and received else \
            getattr(info.exc_value, "signal", None) if type(info.exc_value).__name__ == "TerminationSignal" else None
        if lost is not None:
            again = threading.Timer(0.05, os.kill, (os.getpid(), lost))
            again.daemon = True
            again.start()
            return
        hook(info)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = unraisable
    try:
        yield received
    finally:
        sys.unraisablehook = hook
        interrupts.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_flow(ws, call: Callable[[], Any], started: float, tracking: tuple[str | None, str],
              closing: Callable[[Any], list[str]] | None = None) -> tuple[Any, float]:
    """Run a flow (`call`) on the workspace's temporary Prefect server (stopped after the flow's
    last report) as `rsir run`, `rsir tune` and `rsir experiment` do, and stop it cleanly on Ctrl-C
    or SIGTERM: what the command had open is closed (`_close_interrupted`; `closing(tracker)` closes
    and names the command's own records), one line on stderr says so and that the same command
    resumes, and the process exits 128 + the signal. `tracking`: the flows' MLflow tracking URI
    (None: the workspace's) and experiment. Returns (the flow's result, the server's start
    seconds since `started`)."""
    from deployments.temporary import prefect_api

    # The flow runs are found by this tag when interrupted (they have no id the CLI knows); their
    # subflows inherit it.
    tag = f"rsir-cli-{uuid.uuid4().hex[:12]}"
    closed = ""  # the line that says what an interrupt closed
    with _interrupts() as received:
        try:
            with prefect_api(Path(os.environ["PREFECT_HOME"])):
                server_start = time.perf_counter() - started
                try:
                    import prefect

                    with prefect.tags(tag):
                        return call(), server_start
                except BaseException as exc:
                    if received or isinstance(exc, KeyboardInterrupt):
                        closed = _close_interrupted(ws, tracking, tag, received[0] if received else signal.SIGINT,
                                                    time.perf_counter() - started, closing)
                    raise
        except BaseException as exc:
            if not (received or isinstance(exc, KeyboardInterrupt)):
                raise
            signum = received[0] if received else signal.SIGINT
            print(closed or f"rsir: interrupted by {signal.Signals(signum).name} while the Prefect server "
                            f"started or stopped; no flow was running", file=sys.stderr)
            sys.exit(128 + signum)


def _close_interrupted(ws, tracking: tuple[str | None, str], tag: str, signum: int, seconds: float,
                       closing: Callable[[Any], list[str]] | None) -> str:
    """After an interrupt: the command's Prefect flow runs CANCELLED (with their open subflow and
    task runs), the MLflow parent run of each flow run that had not completed KILLED (the flow's
    own handler ends it so; here it is checked, and a run it missed is ended), then `closing`'s
    records. Returns the one line that says so and how to resume. Never raises."""
    from flows.liveness import cancel_tagged_flow_runs
    from storage.tracking import Tracker, resolve_tracking_uri

    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the closing short
        signal.signal(sig, signal.SIG_IGN)
    reason = f"interrupted by {signal.Signals(signum).name}"
    flow_runs = cancel_tagged_flow_runs(tag, f"{reason}; the same command resumes it")
    closed = [outcome for _, outcome in flow_runs.closed]
    try:
        tracker = Tracker.open(resolve_tracking_uri(tracking[0], ws.mlflow_db), tracking[1], ws.mlartifacts)
        for flow_run in flow_runs.open_flow_runs:
            for run in tracker.search_runs(f"tags.`prefect.flow_run_id` = '{flow_run}'"):
                status = run.info.status
                if status == "RUNNING":  # interrupted before the flow's handler could end it
                    tracker.end_run(run.info.run_id, "KILLED")
                    status = "KILLED"
                if status == "KILLED":  # not a run that had failed or finished before (a pruned trial's)
                    closed.append(f"MLflow run {run.info.run_id} {status}")
        closed += closing(tracker) if closing is not None else []
    except Exception as exc:  # tracking unreachable: the line says so, the exit status stays
        closed.append(f"MLflow not checked ({type(exc).__name__})")
    closed = closed or ["no run had started"]
    return f"rsir: {reason} after {seconds:.1f} s; {', '.join(closed)}; run the same command again to resume"


app.command("run")(with_parameters(run, _run_options()))


# `rsir tune`'s options are the tuning flow's parameters (tasks/tune.py tune_parameters), derived
# as `rsir run`'s are; a range is given as text: --tau "1..50 log", --p "0..1 step 0.5", --m 3.
def _tune_options() -> list[Parameter]:
    from tasks.tune import tune_parameters

    # A range's parameter is text or one number; on the command line, text ("5" is one value).
    text = [Parameter(p.name, Optional[str], p.default, p.help) if str in get_args(p.annotation) else p
            for p in tune_parameters()]
    return [_as_option(p) for p in text if p.name != "home"] + [
        Parameter("home", Home, None, ""), Parameter("as_json", Json, False, "")]


def tune(**params: Any) -> None:
    """Search RSIR's settings (τ, p, m, λ, the generation budget) on validation with an Optuna
    study: each trial an `rsir` run at K = 1 scored on θ_1's validation NDCG@10; the best θ_1 is
    registered with its settings. Several `rsir tune` processes (or `rsir-tune/tune` deployment runs)
    with the same study and storage add trials to one study."""
    from tasks.tune import TuneConfig, check_storage

    home, as_json = params.pop("home"), params.pop("as_json")
    ws = _workspace(home)
    if params.get("run_params") is not None:
        params["run_params"] = _nested_pairs(params["run_params"], "--run-params")
    params["home"] = ws.home
    with _given_as_options():
        cfg = TuneConfig.from_parameters(params)  # a bad range or URL: one line, before Prefect is imported
    _before_flow(ws, cfg.run_config(cfg.seeds[0], cfg.corner()).tracking_uri, [cfg.dataset],
                 lambda: check_storage(cfg.storage_url(ws.root)))
    from flows.tune import close_interrupted
    from flows.tune import tune as tune_flow

    started = time.perf_counter()
    first = cfg.run_config(cfg.seeds[0], cfg.corner())
    summary, _ = _run_flow(ws, lambda: tune_flow(**params), started, (first.tracking_uri, first.experiment),
                           lambda tracker: close_interrupted(cfg, cfg.storage_url(ws.root), tracker))
    summary["command_seconds"] = time.perf_counter() - started
    _emit(summary, as_json, _render_tune)


def _render_tune(summary: dict[str, Any]) -> None:
    """The study for people, from the tuning flow's summary (its JSON, tasks/tune.py TuneSummary)."""
    from tasks.tune import TuneSummary

    r = TuneSummary.model_validate(summary)
    t = r.trials
    print(f"study {r.study} ({r.storage}): {t.total} trials ({t.this_worker} by this worker): "
          f"{t.complete} complete, {t.pruned} pruned, {t.fail} failed, {t.running} running")
    for row in r.rows:
        value = "-" if row.value is None else f"{row.value:.4f}"
        settings = " ".join(f"{k}={v:g}" for k, v in row.settings.items())
        stopped = f"  (stopped at step {row.last_report[0]}: {row.last_report[1]:.4f})" \
            if row.state == "PRUNED" and row.last_report else ""
        print(f"  trial {row.number:>3} {row.state:<8} valid {value:>6}  {settings}{stopped}")
    best = r.best
    if best is None:
        print("best: no complete trial yet")
    else:
        settings = ", ".join(f"{k}={'all' if v is None else format(v, 'g')}" for k, v in best.settings.items())
        change = f"{100 * best.gain / best.theta0_valid:+.1f}%" if best.theta0_valid else f"{best.gain:+.4f}"
        print(f"best: trial {best.trial} ({settings}): valid ndcg@10 of θ_1 {best.valid:.4f} against "
              f"θ_0's {best.theta0_valid:.4f} ({change})")
        if not best.beats_theta0:
            print("  no setting beat θ_0 on validation: keep θ_0")
        reg = r.registered
        if reg is not None:
            print(f"registered: θ_1 of trial {reg.trial} as {reg.model} v{reg.version} "
                  f"(@champion v{reg.champion_version})")
    u = r.reuse
    print(f"reuse: θ_0 trained {u.theta0_trained}x, reused {u.theta0_reused}x (saved "
          f"{u.theta0_seconds_saved:.1f} s); {u.generations} generations for {u.runs} runs")
    wall = f"wall {r.command_seconds:.1f} s (flow {r.wall_seconds:.1f} s)" if r.command_seconds is not None else \
        f"wall {r.wall_seconds:.1f} s"
    print(f"{wall}; MLflow study run {r.mlflow_run_id} ({r.tracking_uri})")


app.command("tune")(with_parameters(tune, _tune_options()))


# `rsir generate`'s generation options are GenerationParams' fields (tasks/config.py), derived as
# `rsir run`'s are (the defaults, types and help declared once there); `--fidelity` is the run's
# switch (RunConfig), `--device` defaults to auto; the rest are the command's own.
_GENERATE_FIELDS = ("tau", "p", "m", "min_len", "max_len")
_GENERATE_RUNTIME = ("seed", "batch_size", "incremental", "item_chunk", "retrieval", "candidates", "nprobe")
_FLAGS = {"incremental": "--incremental/--full-forward"}


def _generate_options() -> list[Parameter]:
    from tasks.config import GenerationParams, RunConfig

    def knob(name: str, default: Any = None) -> Parameter:
        field = GenerationParams.model_fields[name]
        option = _as_option(Parameter(name, bare(field.annotation), field.default if default is None else default,
                                      field.description or ""))
        if name in _FLAGS:
            return Parameter(name, Annotated[bool, typer.Option(_FLAGS[name], help=field.description)],
                             field.default, "")
        return option

    fidelity = RunConfig.model_fields["fidelity"]
    own = Parameter
    return [
        own("dataset", Annotated[str, typer.Option(help="dataset to expand")], inspect.Parameter.empty, ""),
        own("checkpoint", Annotated[str, typer.Option(help="generator checkpoint (trained on this dataset's items; "
                                                      "a path or a URL)")], inspect.Parameter.empty, ""),
        own("version", Annotated[Optional[int], typer.Option(help="version to expand (default: latest)")], None, ""),
        *(knob(name) for name in _GENERATE_FIELDS),
        own("fidelity", Annotated[bool, typer.Option("--fidelity/--no-fidelity", help=fidelity.description)],
            fidelity.default, ""),
        own("mode", Annotated[str, typer.Option(help="rollout (the released algorithm) or extend (second "
                                                "reading)")], "rollout", ""),
        own("holdout_h", Annotated[int, typer.Option(help="extend mode: training items held out from the "
                                                     "prefix")], 1, ""),
        *(knob(name) for name in _GENERATE_RUNTIME),
        knob("device", default="auto"), _threads_option(),
        own("home", Home, None, ""), own("as_json", Json, False, ""),
    ]


app.command("generate")(with_parameters(generate, _generate_options()))


# `rsir experiment`'s options are the suite flow's parameters (tasks/experiment_config.py
# experiment_parameters), derived as `rsir run`'s are; the suite is the command's argument, and
# four take singular spellings: --dataset, --seed and --arm (repeatable) and
# --backbone-option BACKBONE.KEY=VALUE (repeatable).
_EXPERIMENT_FLAGS = {"datasets": "--dataset", "seeds": "--seed", "arms": "--arm",
                     "backbone_options": "--backbone-option"}


def _experiment_options() -> list[Parameter]:
    from tasks.experiment_config import experiment_parameters

    out = []
    for p in experiment_parameters():
        if p.name == "suite":
            out.append(Parameter(p.name, Annotated[str, typer.Argument(help=p.help)], p.default, ""))
        elif p.name != "home":
            out.append(_as_option(p, _EXPERIMENT_FLAGS.get(p.name)))
    return out + [Parameter("home", Home, None, ""), Parameter("as_json", Json, False, "")]


def experiment_cmd(**params: Any) -> None:
    """Run an experiment suite (skipping finished arms) and print what ran."""
    from tasks.experiment_config import ExperimentConfig

    home, as_json = params.pop("home"), params.pop("as_json")
    ws = _workspace(home)
    params["model_params"] = _nested_pairs(params["model_params"], "--model-params")
    params["backbone_options"] = _backbone_options(params["backbone_options"])
    params["home"] = ws.home
    # A bad value: one line before the flow (and a Prefect server) starts.
    with _given_as_options():
        cfg = ExperimentConfig.from_parameters(params)
    _before_flow(ws, cfg.tracking_uri, cfg.datasets or [])
    from flows.experiments import experiment

    summary, _ = _run_flow(ws, lambda: experiment(**params), time.perf_counter(),
                           (cfg.tracking_uri, cfg.experiment_name))
    _emit(summary, as_json, lambda r: print(
        f"suite {r['suite']}: {len(r['ran'])} arms run, {len(r['skipped'])} already finished, "
        f"{r['wall_seconds']:.0f} s; MLflow experiment {r['experiment']!r} ({r['tracking_uri']})"
        + "".join(f"\nwaiting: {p}" for p in r.get("pending", []))))


app.command("experiment")(with_parameters(experiment_cmd, _experiment_options()))


# `rsir report` names a suite's invocation as `rsir experiment` does: those options (the suite,
# its smoke run, the MLflow tracking URI and experiment, the archive) are ExperimentConfig's
# fields, typed and explained by `_as_option` from experiment_parameters(); the report's own
# (out, command, notes) are declared here.
_REPORT_FIELDS = ("smoke", "tracking_uri", "experiment", "archive")


def _report_options() -> list[Parameter]:
    from tasks.experiment_config import experiment_parameters

    given = {p.name: p for p in experiment_parameters()}
    suites = get_args(given["suite"].annotation)
    own = Parameter
    return [
        own("suite", Annotated[str, typer.Argument(help=f"the suite whose results to report: {', '.join(suites)}")],
            inspect.Parameter.empty, ""),
        own("out", Annotated[Optional[Path], typer.Option(
            help="folder for report.md and figures (default WORKSPACE/reports/EXPERIMENT)")], None, ""),
        *(_report_option(given[name]) for name in _REPORT_FIELDS),
        own("command", Annotated[Optional[str], typer.Option(
            help="the command that produced the results, quoted in the report")], None, ""),
        own("notes", Annotated[Optional[Path], typer.Option(
            help="markdown file appended as the report's Notes section")], None, ""),
        own("home", Home, None, ""), own("as_json", Json, False, "")]


def _report_option(p: Parameter) -> Parameter:
    """An ExperimentConfig field as `rsir report`'s option: --smoke reads the smoke run's
    results (its experiment), it does not trim anything."""
    if p.name == "smoke":
        p = dataclasses.replace(p, help=f"report the suite's --smoke run ({p.help})")
    if p.name == "archive":  # a report runs no stage: it only reads the archive
        p = dataclasses.replace(p, help=f"{p.help.split(':')[0]}: restored into MLflow before the report is written")
    return _as_option(p, "--smoke" if p.name == "smoke" else None)


def _require_file(path: Path | None, flag: str) -> None:
    """A file option names a readable file: else one line, the value shortened (text given where a
    path was expected made `is_file` raise 'File name too long', echoed whole)."""
    if path is None:
        return
    try:
        ok = path.is_file()
    except OSError:  # a name too long for the file system, a component that is not a directory
        ok = False
    if not ok:
        shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
        raise RsirError(f"{flag} {shown}: not a file (give the path of a file)")


def report_cmd(**params: Any) -> None:
    """Write report.md and PNG figures from a suite's MLflow runs, and log them to MLflow."""
    from storage.tracking import Tracker, resolve_tracking_uri
    from tasks.experiment_config import ExperimentConfig

    home, as_json, out = params.pop("home"), params.pop("as_json"), params.pop("out")
    command, notes = params.pop("command"), params.pop("notes")
    ws = _workspace(home)
    with _given_as_options():
        cfg = ExperimentConfig.from_parameters(params)  # a bad suite or value: one line, naming it
    _require_file(notes, "--notes")  # before the archive is restored: input first, then work
    uri = resolve_tracking_uri(cfg.tracking_uri, ws.mlflow_db)
    tracker = Tracker.open(uri, cfg.experiment_name, ws.mlartifacts)
    if cfg.archive is not None:
        from tasks.archive import restore_runs

        restore_runs(tracker, Path(cfg.archive))
    folder = out or ws.root / "reports" / cfg.experiment_name
    _local_prefect(ws)
    from reporting.report import write_report

    result = write_report(tracker, cfg.suite, Path(folder), command=command,
                          notes=notes.read_text() if notes is not None else None)
    _emit(result, as_json, lambda r: print(f"report written to {r['report']} ({len(r['figures'])} figures); "
                                           f"logged to MLflow run {r['mlflow_run_id']}"))


app.command("report")(with_parameters(report_cmd, _report_options()))


def _backbone_options(pairs: list[str] | None) -> dict[str, dict[str, Any]] | None:
    """'hstu.dropout=0.5' and 'cl4srec.options.cl_weight=0.05' -> nested per-backbone params."""
    if not pairs:
        return None
    out: dict[str, dict[str, Any]] = {}
    for key, value in (_options(pairs) or {}).items():
        path = key.split(".")
        if len(path) < 2 or not all(path):
            raise RsirError(f"--backbone-option expects BACKBONE.KEY=VALUE, got {key!r}")
        node = out.setdefault(path[0], {})
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _serve_help(field: str) -> str:
    from deployments.serve import ServeConfig

    return ServeConfig.model_fields[field].description or ""


def _serve_default(field: str) -> Any:
    """`rsir serve`'s default for a ServeConfig field: the field's (declared once there)."""
    from deployments.serve import ServeConfig

    return ServeConfig.model_fields[field].default


@app.command("serve")
def serve(
    only: Annotated[Optional[list[str]], typer.Option(
        "--only", help="run only this service: prefect, mlflow or worker (repeatable)")] = None,
    mlflow: Annotated[bool, typer.Option("--mlflow", help="also run an MLflow tracking server; workers log to it")] = False,
    host: Annotated[str, typer.Option(help=_serve_help("host"))] = _serve_default("host"),
    port: Annotated[int, typer.Option(help=_serve_help("port"))] = _serve_default("port"),
    database: Annotated[Optional[str], typer.Option(help=_serve_help("database"))] = None,
    workers: Annotated[int, typer.Option(help=_serve_help("workers"))] = _serve_default("workers"),
    mlflow_port: Annotated[int, typer.Option(help=_serve_help("mlflow_port"))] = _serve_default("mlflow_port"),
    mlflow_workers: Annotated[int, typer.Option(help=_serve_help("mlflow_workers"))] = _serve_default("mlflow_workers"),
    tracking_uri: Annotated[Optional[str], typer.Option(help=_serve_help("tracking_uri"))] = None,
    prefect_api: Annotated[Optional[str], typer.Option(help=_serve_help("prefect_api"))] = None,
    ready_file: Annotated[Optional[str], typer.Option(hidden=True, help="write a JSON of the endpoints once ready")] = None,
    home: Home = None,
) -> None:
    """Start the services: a Prefect server, the work pool, the deployments and workers; with
    --mlflow an MLflow tracking server too (Ctrl-C stops all)."""
    from deployments.serve import serve as run_serve

    services = only or ["prefect", "worker", *(["mlflow"] if mlflow else [])]
    run_serve(_workspace(home).home, _drop_none(
        services=services, host=host, port=port, database=database, workers=workers, mlflow_port=mlflow_port,
        mlflow_workers=mlflow_workers, tracking_uri=tracking_uri, prefect_api=prefect_api), ready_file=ready_file)


def _options(pairs: list[str] | None, flag: str = "--option") -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RsirError(f"{flag} expects KEY=VALUE, got {pair!r}")
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
    print(f"{r['model']} on {r['dataset']} v{r['version']} (digest {short_digest(r['digest'])}), seed {r['seed']}, "
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
    from storage.tracking import mlflow_environment_defaults

    mlflow_environment_defaults(os.environ)
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.TyperException as exc:  # a bad option value, a missing or unknown option (Click's)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `rsir` alone, `rsir data`: the help
            print(exc.format_message())
            sys.exit(exc.exit_code)
        command = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) is not None else ""
        _fail(f"{command}{exc.format_message()}")
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        from flows.boundary import describe

        line = describe(exc)  # None: a bug, which keeps its traceback
        if line is None:
            raise
        _fail(line)
    if isinstance(code, int) and code:  # typer.Exit(code), and 130 for Ctrl-C
        sys.exit(code)


def _fail(line: str) -> None:
    """The one line of a fault the user can fix, and exit status 2."""
    from flows.boundary import print_error

    print_error(line)
    sys.exit(2)


if __name__ == "__main__":
    main()
