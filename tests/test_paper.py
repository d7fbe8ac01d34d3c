"""The paper suite (issue 22) as a smoke run on slices of the real files in ../shared/data: the
grid chooses the strong trainer on validation, Table 1 runs both trainers with K = 1, Table 2 runs
with and without fidelity under the trainer validation prefers, weak-to-strong trains HSTU on
SASRec's data, and the report puts the paper's figures beside ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.workspace import Workspace
from reporting.results import best_on_validation, collect_runs
from storage.tracking import Tracker

pytestmark = pytest.mark.prefect

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SLICE_USERS = 150
SMOKE = dict(smoke=True, datasets=["amazon-beauty", "amazon-sports"], seeds=[0], device="cpu", threads=1)


@pytest.fixture(scope="module")
def paper(prefect_api, tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"the paper's datasets are not at {DATA} (CI has them)")
    from flows.experiments import experiment
    from tasks.ingest import ImportSpec, import_dataset

    root = tmp_path_factory.mktemp("paper")
    ws = Workspace.at(root / "workspace")
    # The first users of each real file, under the built-in names (a dataset present is never fetched).
    for name, file in (("amazon-beauty", "Beauty.txt"), ("amazon-sports", "Sports_and_Outdoors.txt")):
        lines = (DATA / file).read_text().splitlines()[:SLICE_USERS]
        part = root / file
        part.write_text("\n".join(lines) + "\n")
        import_dataset(ws, ImportSpec(path=part, name=name, format="sequences", kcore=0))
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = experiment(suite="paper", home=str(ws.root), tracking_uri=uri, **SMOKE)
    return ws, uri, summary


def test_paper_suite_stages_and_choices(paper):
    ws, uri, summary = paper
    rows = collect_runs(Tracker.open(uri, summary["experiment"]))
    grid = [r for r in rows if r["stage"] == "grid"]
    assert {(r["trainer"], r["k"]) for r in grid} == {("default", 0), ("dropout=0.5", 0)}
    strong = best_on_validation(grid, "amazon-beauty", "trainer", k=0)
    t1 = [r for r in rows if r["stage"] == "table1"]
    assert {(r["dataset"], r["trainer"], r["seed"], r["k"]) for r in t1} == {
        (ds, t, str(s), k) for ds in ("amazon-beauty", "amazon-sports") for t in ("release", "release-bce", "strong")
        for s in (0,) for k in (0, 1)}
    assert {r["strong"] for r in t1} == {strong}
    # The release arms train under the authors' recipe (sampled softmax, or BCE for release-bce), the
    # strong ones under ours.
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for r in t1:
        params = client.get_run(r["parent_run_id"]).data.params
        assert params["recipe"] == ("default" if r["trainer"] == "strong" else "release"), params["recipe"]
        losses = {v for k, v in params.items() if k.endswith("loss")}
        assert losses == ({"bce"} if r["trainer"] == "release-bce" else {"sampled"} if r["trainer"] == "release"
                          else losses - {"bce"}), (r["trainer"], losses)
    t2 = [r for r in rows if r["stage"] == "table2"]
    chosen = best_on_validation(t1, "amazon-sports", "trainer", k=0)
    assert {r["trainer"] for r in t2} == {chosen} and {r["dataset"] for r in t2} == {"amazon-sports"}
    assert {(r["fidelity"], r["seed"], r["k"]) for r in t2} == {
        (f, "0", k) for f in ("True", "False") for k in (0, 1, 2)}
    # Both arms generate from as many sources per iteration as D_0 has sequences (one per user of
    # the slice), whatever their D_k grew to: the same generation budget.
    d0 = {r["data/sequences"] for r in t1 if r["dataset"] == "amazon-sports" and r["k"] == 0}
    assert d0 == {SLICE_USERS} and {(r["sources"], r["settings"]["max_sources"]) for r in t2} == {
        (str(SLICE_USERS), str(SLICE_USERS))}
    assert {r["data/sequences"] for r in t2 if r["k"] == 2 and r["fidelity"] == "False"} != {SLICE_USERS}
    assert {r["generation/sources"] for r in t2 if r["k"] < 2} == {SLICE_USERS}
    # Table 2's fidelity arm extends the Table 1 arm of the same trainer: the same θ_0 and θ_1.
    same = [r["test/ndcg@10"] for r in t1 + t2 if r["dataset"] == "amazon-sports" and r["trainer"] == chosen
            and r["k"] == 1 and r.get("fidelity", "True") == "True"]
    assert len(same) == 2 and same[0] == same[1]
    # The control: release-bce's θ_0 again with patience 100 (the smoke's 2 epochs cap it), lead datasets.
    control = [r for r in rows if r["stage"] == "control"]
    assert {(r["dataset"], r["trainer"], r["k"], r["patience"]) for r in control} == {
        (ds, "release-bce", 0, 100) for ds in ("amazon-beauty", "amazon-sports")}
    w2s = [r for r in rows if r["stage"] == "weak-to-strong"]
    assert {(r["dataset"], r["seed"], r["k"]) for r in w2s} == {("amazon-beauty", "0", k) for k in (0, 1)}
    # A re-run skips everything.
    from flows.experiments import experiment

    again = experiment(suite="paper", home=str(ws.root), tracking_uri=uri, **SMOKE)
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(summary["ran"])


def test_arm_patterns_select_arms_before_the_shards_split_them(paper):
    """--arm picks arms by name (shell patterns) and --shard splits what was picked; a pattern that
    picks nothing fails with one line naming the suite's arms."""
    from core.errors import RsirError
    from flows.experiments import experiment

    ws, uri, _ = paper
    picked = experiment(suite="paper", home=str(ws.root), tracking_uri=uri, arms=["table1/strong"], **SMOKE)
    assert picked["ran"] == [] and sorted(picked["skipped"]) == [
        "amazon-beauty/table1/strong/seed0", "amazon-sports/table1/strong/seed0"]
    # Table 1's arms in order: beauty release, release-bce, strong, then sports'; shard 1/2 takes every other.
    split = experiment(suite="paper", home=str(ws.root), tracking_uri=uri, arms=["table1/*"], shard="1/2", **SMOKE)
    assert split["skipped"] == ["amazon-beauty/table1/release-bce/seed0", "amazon-sports/table1/release/seed0",
                                "amazon-sports/table1/strong/seed0"]
    with pytest.raises(RsirError, match=r"--arm table3/\* matches no arm of the paper suite .*table1/strong"):
        experiment(suite="paper", home=str(ws.root), tracking_uri=uri, arms=["table3/*"], **SMOKE)


def test_paper_report_sets_the_papers_figures_beside_ours(paper, tmp_path):
    from reporting.report import write_report

    _, uri, summary = paper
    out = write_report(Tracker.open(uri, summary["experiment"]), "paper", tmp_path, command="rsir experiment paper")
    text = Path(out["report"]).read_text()
    assert "## Table 1" in text and "0.0557 → 0.0594 (+6.6%)" in text and "0.0495 → 0.0512 (+3.4%)" in text
    assert "## Table 2: amazon-sports" in text and "| base | 0.0271 | 0.0474 |" in text
    assert "## Weak-to-strong on amazon-beauty" in text and "+1.9%" in text
    assert "(i) **Does the release recipe reproduce the paper's baseline?**" in text
    assert "(ii) **Does RSIR improve that baseline" in text and "(iii) **Does RSIR improve a strong baseline?**" in text
    assert "## The strong trainer" in text
    control = text.split("## Control: `release-bce` θ_0 trained for longer")[1].split("\n## ")[0]
    assert "| amazon-sports | θ_0, patience 1 |" in control and "| amazon-sports | θ_0, patience 100 |" in control
    assert "| amazon-beauty | θ_1 (RSIR K = 1) |" in control
    # Answer (ii) sets each controlled row's θ_1 against the control's θ_0 beside its own change.
    (ii,) = [line for line in text.splitlines() if line.startswith("(ii)")]
    for ds in ("amazon-beauty", "amazon-sports"):
        row = ii.split(f"{ds} (release-bce): ")[1].split("; ")[0]
        assert "(but against θ_0 trained for longer, the control: Recall@10 " in row, row
    assert "(release): " in ii and ii.count("trained for longer") == 2
    # Seconds per device as each run resolved it (the suite asked for "cpu"; none ran elsewhere).
    table1 = text.split("## Table 1")[1].split("\n## ")[0]
    assert " (cpu) / " in table1 and "(cuda)" not in text and "(auto)" not in text


def test_other_datasets_wait_for_the_grid(prefect_api, tmp_path):
    """The strong trainer comes from the grid on amazon-beauty: a suite on the other datasets alone
    fails before compute until that grid has finished, naming what to run."""
    from core.errors import RsirError
    from flows.experiments import experiment

    with pytest.raises(RsirError, match="trainer grid on amazon-beauty has not finished"):
        experiment(suite="paper", smoke=True, datasets=["yelp"], home=str(tmp_path / "ws"), device="cpu")


def test_a_finished_selection_is_not_held_up_by_a_stage_it_cannot_select(prefect_api, tmp_path):
    """`--arm control/*` whose arms have finished exits cleanly although the grid, which it does not
    select, has not run (it failed with the grid's "has not finished", exit 2, so a retry loop never
    ended); a pattern that could select a waiting stage's arms still fails naming what to run."""
    if not DATA.is_dir():
        pytest.skip(f"the paper's datasets are not at {DATA} (CI has them)")
    from core.errors import RsirError
    from flows.experiments import experiment
    from tasks.ingest import ImportSpec, import_dataset

    ws = Workspace.at(tmp_path / "ws")
    part = tmp_path / "Beauty.txt"
    part.write_text("\n".join((DATA / "Beauty.txt").read_text().splitlines()[:SLICE_USERS]) + "\n")
    import_dataset(ws, ImportSpec(path=part, name="amazon-beauty", format="sequences", kcore=0))
    kw = dict(suite="paper", home=str(ws.root), tracking_uri=f"sqlite:///{ws.root / 'mlflow.db'}",
              **{**SMOKE, "datasets": ["amazon-beauty"]})
    first = experiment(arms=["control/*"], **kw)
    assert first["ran"] == ["amazon-beauty/control/release-bce-patience100/seed0"] and first["pending"] == []
    again = experiment(arms=["control/*"], **kw)
    assert again["ran"] == [] and again["skipped"] == first["ran"] and again["pending"] == []
    for pattern in ("table1/*", "*/strong", "sasrec-to-hstu"):
        with pytest.raises(RsirError, match="trainer grid on amazon-beauty has not finished"):
            experiment(arms=[pattern], **kw)


def test_shards_split_every_stage_and_are_checked():
    from core.config import parse_config
    from core.errors import RsirError
    from tasks.experiment_config import ExperimentConfig

    cfgs = [parse_config(ExperimentConfig, {"suite": "paper", "shard": f"{i}/2"}) for i in (0, 1)]
    assert [[c.in_shard(j) for j in range(5)] for c in cfgs] == [[True, False, True, False, True],
                                                                  [False, True, False, True, False]]
    for bad in ("2/2", "1/0", "a/b"):
        with pytest.raises(RsirError, match="shard"):
            parse_config(ExperimentConfig, {"suite": "paper", "shard": bad})


def test_every_shard_joins_every_study_and_splits_the_arms():
    """A study's trials are shared through its budget (study_trials), so each shard is one more
    worker of every study; arms, which nothing shares, are split (after --arm selects)."""
    from core.config import parse_config
    from flows.experiments import Arm, Study, this_shard
    from tasks.experiment_config import ExperimentConfig

    studies = [Study(dataset=d, params={"study": f"s-{d}"}, budget=4) for d in ("a", "b", "c")]
    arms = [Arm(arm=name, dataset="a", seed=0, params={}) for name in ("fixed", "tuned", "adaptive", "fixed-2")]
    for i in (0, 1):
        cfg = parse_config(ExperimentConfig, {"suite": "tune", "shard": f"{i}/2", "arms": ["fixed*", "adaptive"]})
        assert this_shard(cfg, studies) == (studies, [])
        got = this_shard(cfg, arms)
        assert got[0] == [] and [a.arm for a in got[1]] == [["fixed", "fixed-2"], ["adaptive"]][i]


def test_an_archive_carries_finished_arms_to_a_new_workspace(paper, tmp_path):
    """The suite outlives its workspace: its finished runs, archived to a folder, restore into a
    new workspace where the suite skips every finished arm and the report reads the same rows and
    per-user ranks. Restoring or archiving twice adds nothing."""
    from flows.experiments import experiment
    from reporting.report import write_report
    from tasks.archive import archive_runs, restore_runs

    _, uri, summary = paper
    original = Tracker.open(uri, summary["experiment"])
    folder = tmp_path / "archive"
    written = archive_runs(original, folder)
    assert written and archive_runs(original, folder) == []
    assert len(list(folder.glob("*.parquet"))) == len([r for r in collect_runs(original)])

    new = Workspace.at(tmp_path / "new")
    new_uri = f"sqlite:///{new.root / 'mlflow.db'}"
    again = experiment(suite="paper", home=str(new.root), tracking_uri=new_uri, archive=str(folder), **SMOKE)
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(summary["ran"])
    restored = Tracker.open(new_uri, summary["experiment"])
    assert restore_runs(restored, folder) == []

    def rows(tracker):
        return [{k: v for k, v in r.items() if not k.endswith("run_id")} for r in collect_runs(tracker)]

    assert rows(restored) == rows(original)
    before = write_report(original, "paper", tmp_path / "before")["report"]
    after = write_report(restored, "paper", tmp_path / "after")["report"]
    table1 = [Path(p).read_text().split("## Table 1")[1].split("\n## ")[0] for p in (before, after)]
    assert table1[0] == table1[1] and "±" in table1[0]
    # The new workspace's suite run (it skipped every arm) was archived at its end; reports are not.
    assert archive_runs(restored, folder) == [] and len(list(folder.glob("*.json"))) == len(written) + 1


def test_table2_is_reported_once_per_generation_budget(paper, tmp_path):
    """Arms that ran under different generation budgets (the suite's Table 2 generated from every
    sequence of D_k before it took |D_0| sources per iteration) are never averaged together: one
    table per budget, the uncapped first, the figures of the last."""
    from reporting.report import Paired, _table2_section

    _, uri, summary = paper
    tracker = Tracker.open(uri, summary["experiment"])
    capped = [r for r in collect_runs(tracker) if r.get("stage") == "table2"]
    uncapped = [{**r, "settings": {**r["settings"], "max_sources": "None"}} for r in capped]
    parts, figures = _table2_section(Paired(tracker), uncapped + capped, tmp_path)
    text = "\n".join(parts)
    heads = [line for line in text.splitlines() if line.startswith("## Table 2")]
    assert heads == ["## Table 2: amazon-sports, base → 1st → K = 2, with and without fidelity (no cap)",
                     f"## Table 2: amazon-sports, base → 1st → K = 2, with and without fidelity (sources per "
                     f"iteration: {SLICE_USERS})"], heads
    assert "Generation budget: every training sequence of D_k (no cap)" in text
    assert f"Generation budget: at most {SLICE_USERS} sources per iteration, drawn uniformly" in text
    assert text.count("| base | 0.0271 | 0.0474 |") == 2 and text.count("Density no fidelity: ") == 2
    assert {p.name for p in figures} == {"metrics_per_iteration.png", "density_entropy_per_iteration.png",
                                         "acceptance_length_per_iteration.png"} and all(p.exists() for p in figures)


def test_a_damaged_archive_is_one_line_naming_the_file(tmp_path):
    from core.errors import RsirError
    from tasks.archive import restore_runs

    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "abc.json").write_text('{"run_id": "abc"')
    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "x")
    with pytest.raises(RsirError, match=r"archived run .*abc\.json cannot be read"):
        restore_runs(tracker, folder)


def test_a_run_whose_ranks_were_lost_reports_its_change_without_an_interval(paper, tmp_path):
    """An archive that lost a rank file (git ignored *.parquet until 2026-11-30) still reports the
    seed's change from the logged metrics, says which seed lacks ranks, and gives no verdict."""
    from reporting.report import write_report
    from tasks.archive import archive_runs, restore_runs

    _, uri, summary = paper
    folder = tmp_path / "archive"
    archive_runs(Tracker.open(uri, summary["experiment"]), folder)
    rows = [r for r in collect_runs(Tracker.open(uri, summary["experiment"])) if r.get("stage") == "table1"]
    # An arm whose θ_0 scored above zero (a smoke model may score nothing: no change to report then).
    lost = next(r for r in rows if r["k"] == 1 and any(
        b["k"] == 0 and b["parent_run_id"] == r["parent_run_id"] and b["test/ndcg@10"] > 0 for b in rows))
    removed = list(folder.glob(f"{lost['run_id']}.*.parquet"))
    assert len(removed) == 1, sorted(p.name for p in folder.iterdir())
    removed[0].unlink()
    new = Workspace.at(tmp_path / "new")
    tracker = Tracker.open(f"sqlite:///{new.root / 'mlflow.db'}", summary["experiment"])
    restore_runs(tracker, folder)
    text = Path(write_report(tracker, "paper", tmp_path / "report")["report"]).read_text()
    table1 = text.split("## Table 1")[1].split("\n## ")[0]
    assert f"[no interval: seed {lost['seed']} lacks per-user ranks]" in table1, table1
    assert "not measured" in table1


def test_the_committed_archive_keeps_its_rank_files_in_git():
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    # Per-user ranks, and the versions an arm cut short continues from (tasks/archive.py).
    for probe in ("docs/results/paper/runs/0123.ranks-sasrec-v0-seed0-abc.parquet",
                  "docs/results/paper/runs/forks/amazon-sports--0123456789/v00001.parquet"):
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=repo).returncode == 0
        assert not ignored, f"{probe} is ignored by .gitignore: the archive's file would never reach git"
