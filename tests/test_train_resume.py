"""A training interrupted between epochs continues from its last saved state (tasks/train.py
ResumePoint) to the weights and curve of the uninterrupted training: the paper suite's trainings
outlast a sitting, and a preemptible worker loses at most `resume_seconds` of work."""

from __future__ import annotations

import pytest
import torch

from storage.checkpoints import read_checkpoint
from tasks.config import TrainConfig
from tasks.train import content_key, train_model
from tests.conftest import make_tiny_home


class Stop(Exception):
    """What an interrupt does to the loop: an exception out of an epoch's end."""


def _config(**change) -> TrainConfig:
    # Patience above the epochs: every epoch runs, so the comparison covers them all.
    return TrainConfig(**{**dict(dataset="tiny", epochs=6, patience=10, device="cpu", threads=1, progress=False,
                                 model={"hidden": 16, "layers": 1, "max_len": 20, "dropout": 0.3},
                                 resume_seconds=0), **change})


def _curve(result) -> list[tuple]:
    return [(p["epoch"], p["loss"], p["valid_ndcg@10"], p["valid_recall@10"]) for p in result.curve]


def _unfinished(ws, cfg):
    from storage.dataset import dataset_store

    manifest = dataset_store(ws).manifest(cfg.dataset, 0)
    return ws.checkpoints / "unfinished" / f"{content_key(cfg, manifest.digest, synthetic=False)}.pt"


@pytest.fixture(scope="module")
def uninterrupted(tiny_csv, tmp_path_factory):
    ws = make_tiny_home(tmp_path_factory.mktemp("straight") / "ws", tiny_csv)
    result = train_model(_config(), ws)
    return result, read_checkpoint(result.checkpoint)["state_dict"]


def _interrupt_at(ws, cfg, epoch: int) -> None:
    def stop(point):
        if point["epoch"] == epoch:
            raise Stop

    with pytest.raises(Stop):
        train_model(cfg, ws, on_epoch=stop)


def test_an_interrupted_training_resumes_to_the_uninterrupted_weights(uninterrupted, tiny_csv, tmp_path, capsys):
    straight, weights = uninterrupted
    ws = make_tiny_home(tmp_path / "ws", tiny_csv)
    cfg = _config()
    _interrupt_at(ws, cfg, 4)  # saved after epoch 3; epoch 4's work is lost
    unfinished = _unfinished(ws, cfg)
    saved = torch.load(unfinished, weights_only=True)
    assert saved["epoch"] == 3 and [p["epoch"] for p in saved["curve"]] == [1, 2, 3]

    resumed = train_model(cfg, ws)
    assert capsys.readouterr().err.count(f"resuming the training after epoch 3 from its saved state {unfinished}") == 1
    assert resumed.resumed_after == 3 and straight.resumed_after == 0
    assert _curve(resumed) == _curve(straight) and resumed.epochs == straight.epochs == 6
    assert resumed.best_epoch == straight.best_epoch and resumed.valid == straight.valid
    assert resumed.test == straight.test
    state = read_checkpoint(resumed.checkpoint)["state_dict"]
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    # The earlier sitting's seconds count in the training's total; nothing is left to resume.
    assert resumed.seconds_total > saved["seconds"] > 0
    assert not unfinished.exists()


def test_an_unreadable_state_starts_over_and_a_later_save_interval_saves_less(uninterrupted, tiny_csv, tmp_path):
    straight, weights = uninterrupted
    ws = make_tiny_home(tmp_path / "ws", tiny_csv)
    cfg = _config()
    unfinished = _unfinished(ws, cfg)
    unfinished.parent.mkdir(parents=True)
    unfinished.write_bytes(b"cut short by a full disk")
    result = train_model(cfg, ws)
    assert _curve(result) == _curve(straight)
    state = read_checkpoint(result.checkpoint)["state_dict"]
    assert all(torch.equal(state[k], weights[k]) for k in weights) and not unfinished.exists()

    # An hour between saves: a training interrupted after minutes has saved nothing.
    slow = make_tiny_home(tmp_path / "slow", tiny_csv)
    _interrupt_at(slow, _config(resume_seconds=3600), 4)
    assert not _unfinished(slow, cfg).exists()


@pytest.mark.parametrize("spoil", ["optimizer", "numpy_rng", "curve"])
def test_a_state_that_fails_part_way_starts_over_from_the_fresh_model(uninterrupted, tiny_csv, tmp_path, spoil):
    """Weights that load but an entry after them that does not: the training starts over from its
    own seed's weights and draws (the uninterrupted result), never from the half-restored state."""
    straight, weights = uninterrupted
    ws = make_tiny_home(tmp_path / "ws", tiny_csv)
    cfg = _config()
    _interrupt_at(ws, cfg, 4)
    unfinished = _unfinished(ws, cfg)
    saved = torch.load(unfinished, weights_only=True)
    if spoil == "curve":
        del saved[spoil]
    else:
        saved[spoil] = {"state": {}, "param_groups": []} if spoil == "optimizer" else {"bit_generator": "none"}
    torch.save(saved, unfinished)
    result = train_model(cfg, ws)
    assert result.resumed_after == 0 and _curve(result) == _curve(straight)
    state = read_checkpoint(result.checkpoint)["state_dict"]
    assert all(torch.equal(state[k], weights[k]) for k in weights) and not unfinished.exists()


def test_the_save_interval_is_a_bounded_run_setting_that_keys_nothing():
    from pydantic import ValidationError

    from tasks.config import RunConfig

    assert content_key(_config(resume_seconds=5), "d") == content_key(_config(resume_seconds=600), "d")
    run = RunConfig(dataset="tiny", resume_seconds=7)
    assert run.train_config("tiny", 0, run.model).resume_seconds == 7
    assert run.lineage_key() == RunConfig(dataset="tiny").lineage_key()
    for bad in (-1, float("nan"), 10 ** 6):
        with pytest.raises(ValidationError, match="resume_seconds"):
            RunConfig(dataset="tiny", resume_seconds=bad)


def test_an_interrupted_rsir_train_says_where_its_state_stands_in_one_line(tiny_csv, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ws = make_tiny_home(tmp_path / "ws", tiny_csv)
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(repo)
    cmd = [sys.executable, "-m", "rsir.cli", "train", "--dataset", "tiny", "--epochs", "100000", "--patience", "100000",
           "--hidden", "16", "--layers", "1", "--max-len", "20", "--device", "cpu", "--threads", "1",
           "--resume-seconds", "0", "--no-progress", "--home", str(ws.root)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    unfinished = ws.checkpoints / "unfinished"
    deadline = time.monotonic() + 300
    while not (unfinished.exists() and any(unfinished.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == "", (out, err)
    (line,) = err.strip().splitlines()
    (saved,) = unfinished.iterdir()
    epoch = torch.load(saved, weights_only=True)["epoch"]
    assert line.startswith("rsir: interrupted by SIGINT after ") and line.endswith(
        f"its state after epoch {epoch} is saved in {saved}; run the same command again to resume from it"), line
