"""Training on the real MovieLens-100K data through the CLI (a few epochs: a sanity floor, not the
quality figure, which is measured by `rsir train` with the defaults and reported in the issue)."""

from __future__ import annotations

import torch

from tasks.evaluate import metric_names

KEYS = {"valid", "test", "epochs", "best_epoch", "seconds_per_epoch", "seconds_total", "checkpoint"}


def test_train_json_and_checkpoint(cli, ml100k_ws):
    result = cli("train", "--dataset", "ml-100k", "--model", "sasrec", "--epochs", "3", "--seed", "1",
                 "--home", ml100k_ws.root, "--json", "--no-progress")
    assert result.code == 0, result.err
    out = result.json()
    assert KEYS <= set(out)
    assert set(out["valid"]) == set(metric_names()) == set(out["test"])
    assert out["epochs"] == 3 and 1 <= out["best_epoch"] <= 3
    # A random ranking of 1682 items gives NDCG@10 ~ 0.003; three epochs must be far above it.
    assert out["valid"]["ndcg@10"] > 0.03 and out["test"]["recall@10"] > 0.05
    payload = torch.load(out["checkpoint"], weights_only=True)
    assert payload["num_items"] == 1682 and payload["backbone"] == "sasrec"

    again = cli("evaluate", "--checkpoint", out["checkpoint"], "--dataset", "ml-100k",
                "--home", ml100k_ws.root, "--json")
    assert again.code == 0, again.err
    assert again.json()["test"] == out["test"]

    # The history exclusion flag changes the protocol (more items compete), never improves it.
    incl = cli("evaluate", "--checkpoint", out["checkpoint"], "--dataset", "ml-100k",
               "--home", ml100k_ws.root, "--json", "--include-history").json()
    assert incl["test"]["ndcg@10"] <= out["test"]["ndcg@10"]


def test_same_seed_same_result(cli, ml100k_ws, tmp_path):
    def run(seed, name):
        r = cli("train", "--dataset", "ml-100k-sparse", "--epochs", "2", "--seed", seed, "--home", ml100k_ws.root,
                "--checkpoint", tmp_path / name, "--json", "--no-progress")
        assert r.code == 0, r.err
        return r.json()

    a, b, c = run(0, "a.pt"), run(0, "b.pt"), run(5, "c.pt")
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert a["valid"] != c["valid"]


def test_evaluate_rejects_mismatched_checkpoint(cli, ml100k_ws, tmp_path):
    ckpt = tmp_path / "m.pt"
    assert cli("train", "--dataset", "ml-100k-sparse", "--epochs", "1", "--home", ml100k_ws.root,
               "--checkpoint", ckpt, "--no-progress").code == 0
    result = cli("evaluate", "--checkpoint", ckpt, "--dataset", "ml-100k", "--home", ml100k_ws.root)
    assert result.code == 2 and "1414 items" in result.err and "1682" in result.err
