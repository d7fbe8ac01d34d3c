"""Adaptive fidelity (`--tau-schedule`): the rank threshold τ_k of iteration k's fidelity control,
chosen per iteration instead of fixed.

- fixed: τ_k = tau.
- leakage: τ_0 = tau; then τ_k = max(1, τ_{k-1} // 2) when the leakage proxy of the data θ_k was
  trained on (tasks/leakage.py: the share of D_k's newest synthetic items θ_k ranks worse than
  τ_{k-1}) exceeds leakage_max, else τ_{k-1}. Why: in the paper's bound
  E(θ_{k+1}) <= (1-λ)E_0 + λ[(1-p̃_k) ρ E(θ_k) + p̃_k E_max] (../shared/docs/rsir-method.md §6) the
  fixed point of the recursion rises with the leakage p̃ and exceeds E_0 past a breakdown p̃*;
  a tighter threshold stops rollouts earlier, at the first real item that leaves the top τ, so
  fewer off-manifold items are accepted. Halving is the simplest contraction that reaches τ = 1
  in log2(tau) steps. τ never rises again: the bound gives no reason to loosen, and a
  loosening rule would need the validation gain the other schedule measures.
- validation: at every iteration one generation at the loosest candidate, re-filtered at each
  candidate (the fidelity trace: equivalent to generating at each), one θ_{k+1} trained per
  candidate in a scratch fork of D_k, and τ_k = the candidate whose θ_{k+1} scores best on
  validation (the run's early-stopping metric; test is never read). Ties go to the smaller τ
  (the tighter control, the bound's safer side). The winner's D_{k+1} has the digest of its
  scratch copy, so the next iteration's θ_{k+1} is that candidate's checkpoint (a cache hit).

Pure rules here, plus the scratch fork each validation candidate is trained in; the flow wires
them (flows/rsir.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import task

from core.workspace import Workspace
from storage.dataset import dataset_store
from tasks.config import RunConfig
from tasks.leakage import Leakage
from tasks.train import TrainResult


@dataclass(frozen=True)
class TauChoice:
    """τ_k and why: the schedule's `rule`, a one-line `reason`; for the validation rule each
    candidate's θ_{k+1} validation score (the run's early-stopping metric, a fraction)."""

    tau: int
    rule: str
    reason: str
    valid: dict[int, float] = field(default_factory=dict)


def leakage_tau(cfg: RunConfig, leakage: Leakage | None) -> TauChoice | None:
    """τ_k of the fixed and leakage schedules from the proxy measured at iteration k (None at
    k = 0, where no synthetic data exists yet: τ_0 = tau). `leakage.tau` is τ_{k-1}, the
    threshold D_k's synthetic data was accepted under (its manifest's). None with fidelity
    control off: no threshold filters anything, so none is logged (the paper's ablation)."""
    if not cfg.fidelity:
        return None
    if cfg.tau_schedule == "fixed" or leakage is None:
        return TauChoice(cfg.tau, cfg.tau_schedule, f"tau={cfg.tau}")
    if leakage.proxy > cfg.leakage_max:
        tau = max(1, leakage.tau // 2)
        return TauChoice(tau, "leakage", f"leakage proxy {leakage.proxy:.4f} > {cfg.leakage_max:g}: "
                                         f"tau {leakage.tau} -> {tau}")
    return TauChoice(leakage.tau, "leakage", f"leakage proxy {leakage.proxy:.4f} <= {cfg.leakage_max:g}: "
                                             f"tau stays {leakage.tau}")


def candidate_score(result: TrainResult, metric: str) -> float:
    """The validation `metric` of a trained θ at its best epoch (the weights it kept), read from
    its training curve: no second evaluation, and never the test split."""
    return float(result.curve[result.best_epoch - 1][f"valid_{metric}"])


def best_on_validation(cfg: RunConfig, valid: dict[int, float]) -> TauChoice:
    """τ_k of the validation schedule: the candidate threshold whose θ_{k+1} has the highest
    validation score in `valid` (τ -> score), the smaller τ of equals. Raises ValueError when
    `valid` is empty."""
    if not valid:
        raise ValueError("best_on_validation needs at least one candidate's score")
    tau = max(sorted(valid), key=lambda t: (valid[t], -t))
    shown = ", ".join(f"{t}: {v:.4f}" for t, v in sorted(valid.items()))
    return TauChoice(tau, "validation", f"best validation {cfg.early_stop} among tau {{{shown}}}: tau={tau}",
                     dict(valid))


def candidate_dataset(dataset: str, k: int, tau: int) -> str:
    """The scratch fork iteration k's candidate `tau` is expanded and trained in."""
    return f"{dataset}--k{k}-tau{tau}"


def fork_candidate_step(home: str, dataset: str, k: int, tau: int) -> str:
    """A scratch copy of `dataset` v`k` as version 0 of its own dataset (idempotent: a resumed
    run finds it): a candidate's D_{k+1} never enters the run's lineage. Returns its name."""
    name = candidate_dataset(dataset, k, tau)
    dataset_store(Workspace.at(home)).fork(dataset, name, version=k)
    return name


@task(name="fork-candidate", task_run_name="fork-v{k}-tau{tau}")
def fork_candidate_task(home: str, dataset: str, k: int, tau: int) -> str:
    return fork_candidate_step(home, dataset, k, tau)
