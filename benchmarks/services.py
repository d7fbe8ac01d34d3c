"""Services on SQLite against PostgreSQL: the same `rsir serve --mlflow --workers 2` with the Prefect
server and the MLflow tracking server on the workspace's SQLite files, then on PostgreSQL; the
same flow runs submitted at once with `prefect deployment run`. Prints one table: start-up time
of the services, and wall time from submission until every run completed.

    .venv/bin/python benchmarks/services.py [--runs 3] [--users 150] [--postgres postgresql://postgres@127.0.0.1:5432]

Data: the first USERS users of the real ml-100k-sparse (fetched into a temporary workspace).
Each backend gets a fresh workspace and fresh databases (dropped afterwards)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLOW = {"dataset": "tiny", "K": 1, "epochs": 2, "patience": 1, "device": "cpu", "threads": 1,
        "model_params": {"hidden": 16, "layers": 1, "max_len": 20}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_workspace(root: Path, users: int) -> Path:
    """A workspace holding `tiny`: the first `users` users of ml-100k-sparse, imported from CSV."""
    import polars as pl

    sys.path.insert(0, str(REPO))
    from core.workspace import Workspace
    from storage.dataset import dataset_store
    from tasks.builtin import fetch_builtin

    source = Workspace.at(root / "source")
    fetch_builtin(source, "ml-100k-sparse")
    seqs = dataset_store(source).load("ml-100k-sparse").sort("seq_id").head(users)
    rows = (seqs.select("user_id", "items").explode("items")
            .with_columns(pl.int_range(pl.len()).over("user_id").alias("timestamp")).rename({"items": "item_id"}))
    csv = root / "tiny.csv"
    rows.write_csv(csv)
    return csv


def run_backend(name: str, csv: Path, root: Path, runs: int, prefect_db: str | None, mlflow_db: str | None) -> dict:
    home = root / name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    subprocess.run([str(BIN / "rsir"), "data", "import", str(csv), "--name", "tiny", "--format", "csv",
                    "--home", str(home)], check=True, env=env, capture_output=True)
    port, mlflow_port, ready = free_port(), free_port(), root / f"{name}.ready"
    cmd = [str(BIN / "rsir"), "serve", "--mlflow", "--workers", "2", "--port", str(port), "--mlflow-port",
           str(mlflow_port), "--home", str(home), "--ready-file", str(ready)]
    cmd += ["--database", prefect_db] if prefect_db else []
    cmd += ["--tracking-uri", mlflow_db] if mlflow_db else []
    started = time.monotonic()
    serve = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while not ready.exists():
            if serve.poll() is not None:
                raise SystemExit(f"{name}: rsir serve exited; see {home}/prefect/logs")
            time.sleep(0.2)
        startup = time.monotonic() - started
        api = json.loads(ready.read_text())["prefect_api"]
        cli_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / f"{name}-cli")}
        submitted = time.monotonic()
        procs = []
        for seed in range(runs):
            args = [str(BIN / "prefect"), "deployment", "run", "rsir/iterate", "--watch", "--watch-timeout", "1800"]
            for key, value in {**FLOW, "seed": seed}.items():
                args += ["--param", f"{key}={json.dumps(value) if isinstance(value, dict) else value}"]
            procs.append(subprocess.Popen(args, cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        completed = sum(p.wait() == 0 for p in procs)
        wall = time.monotonic() - submitted
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(timeout=120)
    return {"backend": name, "startup_s": startup, "runs": runs, "completed": completed, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    import psycopg

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = tiny_workspace(root, args.users)
        rows = [run_backend("sqlite", csv, root, args.runs, None, None)]
        suffix = uuid.uuid4().hex[:8]
        names = [f"rsir_bench_{suffix}_prefect", f"rsir_bench_{suffix}_mlflow"]
        with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as admin:
            for db in names:
                admin.execute(f'CREATE DATABASE "{db}"')
            try:
                rows.append(run_backend("postgresql", csv, root, args.runs,
                                        f"{args.postgres}/{names[0]}".replace("postgresql://", "postgresql+asyncpg://"),
                                        f"{args.postgres}/{names[1]}"))
            finally:
                for db in names:
                    admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print(f"{'backend':<12} {'start-up s':>10} {'runs':>5} {'completed':>9} {'wall s':>8}")
    for r in rows:
        print(f"{r['backend']:<12} {r['startup_s']:>10.1f} {r['runs']:>5} {r['completed']:>9} {r['wall_s']:>8.1f}")
    print(f"postgresql / sqlite wall: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}")


if __name__ == "__main__":
    main()
