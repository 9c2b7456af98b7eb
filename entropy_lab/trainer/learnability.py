"""Whether a run can learn at all: warnings for settings and outcomes with no policy-gradient signal.

Every advantage of the catalogue (``entropy_lab.advantages``) is group-relative: it compares
the samples of one prompt. With one sample per prompt, or when every group's rewards are
equal in every step, each advantage is 0 and the policy gradient is 0. Such a run is not an
error (a KL or entropy term may still move the policy), so these are warnings, one line each.
"""

from __future__ import annotations

from entropy_lab.config import TrainConfig


def setting_warning(cfg: TrainConfig) -> str | None:
    """Before the run: a group size of 1 makes every group-relative advantage 0."""
    if cfg.samples_per_prompt == 1:
        return (
            f"samples_per_prompt=1: the {cfg.advantage} advantage compares samples within a group, so every "
            "advantage is 0 and the policy gradient is 0; use --set samples_per_prompt=2 or more"
        )
    return None


def outcome_warning(metrics_rows: list[dict]) -> str | None:
    """After the run: every advantage of every step was 0 (the rewards never differed within a group)."""
    if not metrics_rows or any(r.get("advantage/zero_frac", 0.0) != 1.0 for r in metrics_rows):
        return None
    rewards = {round(float(r["reward/mean"]), 6) for r in metrics_rows if r.get("reward/std", 1) == 0}
    what = f"every reward was {rewards.pop():g}" if len(rewards) == 1 else "every group's rewards were equal"
    return (
        f"in all {len(metrics_rows)} steps {what}: every advantage was 0, so the policy gradient never moved "
        "the policy; use an easier task, more samples_per_prompt or another reward"
    )
