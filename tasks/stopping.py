"""When an RSIR run stops: after θ_K for a fixed K; for K auto, after the first θ_k whose
validation does not beat the best θ before it by more than the tolerance, or at k_max.

A pure rule over the validation scores the run already holds (the early-stopping metric, the one
the champion is chosen on: tasks/runlog.py RunLog.champion), so a resumed run decides as the
killed one did: its θ_k are reused from the checkpoint store and evaluate to the same scores."""

from __future__ import annotations

from tasks.config import RunConfig


def stop_reason(cfg: RunConfig, valid: list[float]) -> str | None:
    """Why the run ends after θ_k, k = len(valid) - 1, or None to go on to θ_{k+1}.

    `valid`: θ_0..θ_k's validation `cfg.early_stop` (a fraction in [0, 1]). With K auto, θ_k
    (k >= 1) earns another iteration when it beats the best before it, b, by more than the
    relative tolerance t: valid_k > b·(1 + t) (t = -1: always); the run never goes past k_max.
    Raises ValueError for an empty `valid`."""
    if not valid:
        raise ValueError("stop_reason needs θ_0's validation score at least")
    k = len(valid) - 1
    if cfg.K != "auto":
        return f"ran the K={cfg.K} iterations asked" if k >= cfg.K else None
    if k >= 1 and cfg.k_tolerance > -1:
        best = max(range(k), key=lambda i: (valid[i], -i))  # the first of equals, as the champion
        if not valid[k] > valid[best] * (1 + cfg.k_tolerance):
            return (f"stopped after k={k}: validation {cfg.early_stop} {valid[k]:.4f} did not improve on "
                    f"{valid[best]:.4f} (k={best}) by more than {100 * cfg.k_tolerance:g}%")
    if k >= cfg.k_max:
        return f"reached the maximum K={cfg.k_max}"
    return None
