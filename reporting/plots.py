"""PNG plots of a run: metrics per iteration, density and entropy per iteration."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.runlog import IterationRow


def plot_run(rows: list[IterationRow], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ks = [r.iteration for r in rows]
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, split in zip(axes, ("valid", "test")):
        for metric in ("ndcg@10", "ndcg@20", "recall@10", "recall@20"):
            ax.plot(ks, [getattr(r, split)[metric] for r in rows], marker="o", label=metric)
        ax.set_title(f"{split} metrics per iteration")
        ax.set_xlabel("iteration k (model θ_k trained on D_k)")
        ax.set_xticks(ks)
        ax.legend()
    fig.tight_layout()
    paths.append(str(out / "metrics_per_iteration.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(ks, [r.density for r in rows], marker="o", color="tab:blue", label="density")
    ax1.set_xlabel("dataset version k")
    ax1.set_ylabel("interaction density", color="tab:blue")
    ax1.set_xticks(ks)
    ax2 = ax1.twinx()
    ax2.plot(ks, [r.item_entropy for r in rows], marker="s", color="tab:red", label="item entropy")
    ax2.set_ylabel("item-popularity entropy (nats)", color="tab:red")
    ax1.set_title("density and entropy per iteration")
    fig.tight_layout()
    paths.append(str(out / "density_entropy_per_iteration.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


@task(name="plot", retries=1)
def plot_run_task(rows: list[IterationRow], folder: str) -> list[str]:
    return plot_run(rows, folder)
