"""Analyses on synthetic trace records and metrics whose answers are known."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from entropy_lab.analyses import (
    ESTIMATOR_COLUMNS,
    available_estimators,
    compare_runs,
    curves,
    decompose,
    decomposition_summary,
    estimator_column,
    factor_variance_share,
    quadrants,
    residuals_by_factor,
    run_summary,
    t_interval,
    tightness,
    tightness_summary,
)
from entropy_lab.analyses.residuals import correlation_ratio, quantile_bins
from entropy_lab.errors import EntropyLabError


def _entropy(z: np.ndarray) -> np.ndarray:
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    return -(np.exp(logp) * logp).sum(-1)


def tabular_records(n_states: int = 400, vocab: int = 20, eta: float = 1e-3, seed: int = 0) -> pd.DataFrame:
    """Trace records of one exact SGD step on free logits per state (the theory's ground truth).

    Each state samples a token a and ascends w * log pi_a; the measured change is exact.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n_states, vocab))  # (S, V)
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)  # (S, V)
    pi = np.exp(logp)
    h = -(pi * logp).sum(-1)  # (S,)
    a = np.array([rng.choice(vocab, p=p) for p in pi])  # (S,)
    rows = np.arange(n_states)
    advantage = rng.choice([-1.0, 1.0], size=n_states) * rng.uniform(0.2, 1.5, size=n_states)
    ratio = np.ones(n_states)
    weight = advantage * ratio / n_states
    l_all = logp + h[:, None]  # (S, V)
    pa, la = pi[rows, a], l_all[rows, a]
    collision = (pi**2 * l_all).sum(-1)
    onehot = np.zeros_like(z)
    onehot[rows, a] = 1.0
    dz = eta * weight[:, None] * (onehot - pi)  # SGD step on the logits, (S, V)
    measured = _entropy(z + dz) - h
    linear = -(pi * l_all * dz).sum(-1)
    softmax = -eta * weight * (pa * la - collision)
    logp_a = logp[rows, a]
    return pd.DataFrame(
        {
            "step": np.repeat(np.arange(4), n_states // 4),
            "update": 0,
            "sample": rows // 10,
            "position": rows % 10,
            "token_id": a,
            "advantage": advantage,
            "ratio": ratio,
            "clip_indicator": 1.0,
            "intervention_weight": 1.0,
            "normalizer": float(n_states),
            "weight": weight,
            "lr": eta,
            "prob": pa,
            "logprob": logp_a,
            "surprisal": -logp_a,
            "entropy_before": h,
            "entropy_after": h + measured,
            "collision": collision,
            "delta_entropy": measured,
            "delta_logit_linear": linear,
            "omega_paper": -eta * weight * (1 - pa) * la,
            "omega_sampled_logit": -eta * weight * pa * (1 - pa) * la,
            "omega_softmax": softmax,
            "omega_logit_grad": softmax.copy(),
            "omega_covariance": -eta * (logp_a - logp_a.mean()) * (advantage - advantage.mean()) / n_states,
        }
    )


def simple_records(measured: np.ndarray, **omegas: np.ndarray) -> pd.DataFrame:
    n = len(measured)
    frame = pd.DataFrame({"step": 0, "update": 0, "delta_entropy": measured}, index=range(n))
    for name, values in omegas.items():
        frame[ESTIMATOR_COLUMNS[name.replace("_", "-")]] = values
    return frame


# --- tightness -----------------------------------------------------------------------


def test_exact_multiple_gives_known_gain_and_perfect_fit():
    dh = np.random.default_rng(1).normal(size=100)
    row = tightness_summary(simple_records(dh, softmax=2 * dh)).iloc[0]
    assert row["estimator"] == "softmax" and row["n"] == 100
    assert row["gain"] == pytest.approx(0.5)
    assert row["pearson"] == pytest.approx(1.0)
    assert row["spearman"] == pytest.approx(1.0)
    assert row["r2"] == pytest.approx(1.0)
    assert row["sign_agreement"] == 1.0
    assert row["rmse_calibrated"] == pytest.approx(0.0, abs=1e-12)
    assert row["sum_calibrated"] == pytest.approx(row["sum_measured"])
    assert row["sum_predicted"] == pytest.approx(2 * dh.sum())


def test_statistics_match_scipy_and_hand_formulas():
    rng = np.random.default_rng(2)
    dh = rng.normal(size=300)
    omega = 0.3 * dh + rng.normal(scale=0.5, size=300)
    row = tightness_summary(simple_records(dh, paper=omega)).iloc[0]
    gain = (dh * omega).sum() / (omega**2).sum()
    assert row["pearson"] == pytest.approx(stats.pearsonr(omega, dh)[0])
    assert row["spearman"] == pytest.approx(stats.spearmanr(omega, dh)[0])
    assert row["gain"] == pytest.approx(gain)
    r2 = 1 - ((dh - gain * omega) ** 2).sum() / ((dh - dh.mean()) ** 2).sum()
    assert row["r2"] == pytest.approx(r2)
    assert row["rmse_raw"] == pytest.approx(np.sqrt(np.mean((dh - omega) ** 2)))


def test_degenerate_inputs_give_nan_without_warnings():
    dh = np.array([0.1, -0.2, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero = tightness_summary(simple_records(dh, softmax=np.zeros(3))).iloc[0]
        constant = tightness_summary(simple_records(np.ones(3), softmax=np.array([1.0, 2.0, 3.0]))).iloc[0]
        single = tightness_summary(simple_records(dh[:1], softmax=dh[:1])).iloc[0]
        empty = tightness_summary(simple_records(dh[:0], softmax=dh[:0]))
    assert np.isnan(zero["gain"]) and np.isnan(zero["pearson"]) and np.isnan(zero["r2"])
    assert np.isnan(zero["sign_agreement"]) and zero["n_above_floor"] == 0  # zero predictions carry no sign
    assert np.isnan(constant["pearson"]) and np.isnan(constant["r2"]) and np.isfinite(constant["gain"])
    assert single["n"] == 1 and np.isnan(single["pearson"]) and single["gain"] == pytest.approx(1.0)
    assert empty.empty and list(empty.columns)[:2] == ["estimator", "n"]


def test_all_nan_estimator_is_skipped_and_nan_rows_dropped():
    dh = np.array([0.1, -0.2, 0.3, 0.4])
    frame = simple_records(dh, softmax=np.array([0.2, -0.4, np.nan, 0.8]), logit_grad=np.full(4, np.nan))
    assert available_estimators(frame) == ["softmax"]
    table = tightness_summary(frame, estimators=["softmax", "logit-grad"])
    assert list(table["estimator"]) == ["softmax"]
    assert table.iloc[0]["n"] == 3 and table.iloc[0]["gain"] == pytest.approx(0.5)


def test_estimator_columns_match_the_theory_registry():
    from entropy_lab.theory import ESTIMATORS

    # The record contract's built-ins are registered under the same columns; the registry may hold more.
    registered = {name: spec.column for name, spec in ESTIMATORS.items()}
    assert ESTIMATOR_COLUMNS.items() <= registered.items()


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(EntropyLabError, match="softmax"):
        estimator_column("entropy-magic")
    with pytest.raises(EntropyLabError):
        tightness(simple_records(np.ones(2), softmax=np.ones(2)), estimators="nope")


def test_noise_floor_default_rule_and_override():
    # Two tokens above the floor agree; a tiny one of the wrong sign sits below the floor.
    dh = np.array([1.0, -0.5, 1e-5])
    frame = simple_records(dh, softmax=np.array([1.0, -1.0, -1.0]))
    row = tightness_summary(frame).iloc[0]
    assert row["noise_floor"] == pytest.approx(1e-3)
    assert row["n_above_floor"] == 2 and row["sign_agreement"] == 1.0
    strict = tightness_summary(frame, noise_floor=0.0).iloc[0]
    assert strict["n_above_floor"] == 3 and strict["sign_agreement"] == pytest.approx(2 / 3)


def test_groups_and_runs_are_never_pooled_by_default():
    rng = np.random.default_rng(3)
    parts = []
    for run, scale in (("a", 2.0), ("b", 4.0)):
        dh = rng.normal(size=40)
        frame = simple_records(dh, softmax=scale * dh)
        frame["step"] = np.repeat([0, 1], 20)
        frame["run"] = run
        parts.append(frame)
    records = pd.concat(parts, ignore_index=True)
    per_step = tightness(records)
    assert list(per_step.columns[:4]) == ["run", "step", "update", "estimator"]
    assert len(per_step) == 4
    gains = per_step.groupby("run")["gain"].mean()
    assert gains["a"] == pytest.approx(0.5) and gains["b"] == pytest.approx(0.25)
    pooled = tightness_summary(records, split_runs=False)
    assert len(pooled) == 1 and pooled.iloc[0]["n"] == 80
    with pytest.raises(EntropyLabError):
        tightness(records, by=("epoch",))


def test_tabular_sgd_softmax_is_tight_and_closed_form_is_not():
    table = tightness_summary(tabular_records()).set_index("estimator")
    assert table.loc["softmax", "pearson"] > 0.999
    assert table.loc["softmax", "gain"] == pytest.approx(1.0, rel=0.02)
    assert table.loc["softmax", "sign_agreement"] > 0.97
    assert table.loc["sampled-logit", "pearson"] < table.loc["softmax", "pearson"]


# --- residuals -----------------------------------------------------------------------


def test_factor_that_explains_the_residual_gets_full_share():
    rng = np.random.default_rng(4)
    n = 500
    frame = tabular_records(n_states=n)
    level = np.repeat(np.arange(5), n // 5)
    rng.shuffle(level)
    frame["omega_softmax"] = 0.0  # prediction 0, so the residual is the measured change
    frame["delta_entropy"] = 0.01 * level
    frame["surprisal"] = level.astype(float)
    frame["prob"] = rng.uniform(size=n)
    shares = factor_variance_share(frame, calibrated=False).set_index("factor")
    assert shares.loc["surprisal", "share"] == pytest.approx(1.0)
    assert shares.loc["surprisal", "bins"] == 5
    assert shares.loc["probability", "share"] < 0.05


def test_residual_bins_are_consistent():
    frame = tabular_records()
    table = residuals_by_factor(frame, "paper", bins=4)
    assert set(table["factor"]) == {"weight", "probability", "surprisal", "entropy"}
    for _, rows in table.groupby("factor"):
        assert rows["count"].sum() == len(frame)
        assert (rows["bin_low"] <= rows["bin_high"]).all()
        assert (rows["bin_high"].to_numpy()[:-1] <= rows["bin_low"].to_numpy()[1:]).all()
    assert np.allclose(table["mean_residual"], table["mean_measured"] - table["mean_predicted"])
    gain = tightness_summary(frame, "paper").iloc[0]["gain"]
    assert np.allclose(table["gain"], gain)
    raw = residuals_by_factor(frame, "paper", calibrated=False)
    assert raw["gain"].isna().all()
    weighted = (raw["count"] * raw["mean_predicted"]).groupby(raw["factor"]).sum()
    assert np.allclose(weighted, frame["omega_paper"].sum())


def test_binning_keeps_ties_together():
    values = np.array([0.0] * 6 + [1.0] * 2 + [2.0] * 2)
    codes = quantile_bins(values, 5)
    for value in np.unique(values):
        assert len(set(codes[values == value])) == 1
    assert set(quantile_bins(np.ones(7), 5)) == {0}
    assert len(quantile_bins(np.zeros(0), 5)) == 0
    assert sorted(np.bincount(quantile_bins(np.arange(10.0), 5))) == [2] * 5


def test_correlation_ratio_matches_direct_computation():
    rng = np.random.default_rng(5)
    values, codes = rng.normal(size=60), rng.integers(0, 4, size=60)
    share, total, between = correlation_ratio(values, codes)
    means = pd.Series(values).groupby(codes).transform("mean").to_numpy()
    assert share == pytest.approx(
        ((means - values.mean()) ** 2).sum() / ((values - values.mean()) ** 2).sum()
    )
    assert total == pytest.approx(values.var()) and between == pytest.approx(share * total)
    assert np.isnan(correlation_ratio(np.ones(4), np.zeros(4, dtype=int))[0])


# --- decomposition -------------------------------------------------------------------


def test_decomposition_identity_holds_exactly():
    rng = np.random.default_rng(6)
    frame = tabular_records()
    # Perturb so coupling, curvature and omission are all nonzero.
    frame["delta_logit_linear"] *= 1 + 0.1 * rng.normal(size=len(frame))
    frame["omega_logit_grad"] += 1e-7 * rng.normal(size=len(frame))
    parts = decompose(frame)
    rebuilt = parts["omega_logit_grad"] + parts["coupling"] + parts["curvature"]
    assert np.max(np.abs(rebuilt - frame["delta_entropy"])) <= 1e-12 * max(
        1.0, frame["delta_entropy"].abs().max()
    )
    assert np.allclose(parts["omission"], frame["omega_logit_grad"] - frame["omega_paper"])
    assert list(parts.index) == list(frame.index)
    assert {"step", "sample", "position", "token_id"} <= set(parts.columns)


def test_decomposition_summary_shares_and_pooling():
    frame = tabular_records()
    per_step = decomposition_summary(frame)
    pooled = decomposition_summary(frame, by=())
    assert set(per_step["step"]) == {0, 1, 2, 3}
    measured = pooled.set_index("part").loc["delta_entropy"]
    assert measured["share"] == pytest.approx(1.0) and measured["n"] == len(frame)
    coupling = pooled.set_index("part").loc["coupling"]
    assert coupling["share"] == pytest.approx(0.0, abs=1e-9)  # tabular SGD: no coupling
    assert np.allclose(per_step.groupby("part", sort=False)["sum"].sum().to_numpy(), pooled["sum"].to_numpy())
    softmax = decomposition_summary(frame, by=(), base="softmax")
    assert "omega_softmax" in set(softmax["part"])


def test_decomposition_summary_skips_nan_tokens():
    frame = tabular_records().head(8).copy()
    frame.loc[0, "omega_logit_grad"] = np.nan
    pooled = decomposition_summary(frame, by=())
    assert (pooled["n"] == 7).all()


# --- quadrants -----------------------------------------------------------------------


def test_quadrant_counts_on_hand_built_frame():
    # l_a = logprob + entropy_before: +0.5 or -0.5.
    frame = pd.DataFrame(
        {
            "advantage": [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0],
            "logprob": [-0.5, -0.5, -1.5, -1.5, -0.5, -1.5, -1.5, -0.5],
            "entropy_before": [1.0] * 8,
            "delta_entropy": [-0.2, -0.4, 0.3, -0.1, 0.5, -0.2, -0.2, 0.05],
            "omega_softmax": [-0.1, -0.2, 0.1, 0.1, 0.2, -0.1, -0.1, 0.0],
        }
    )
    table = quadrants(frame).set_index("quadrant")
    assert list(table.index) == ["A>0, l>0", "A>0, l<0", "A<0, l>0", "A<0, l<0", "A=0"]
    assert table["count"].tolist() == [2, 2, 1, 2, 1]
    assert table["share"].sum() == pytest.approx(1.0)
    assert table["theory"].tolist() == ["falls", "rises", "rises", "falls", "flat"]
    assert table.loc["A>0, l>0", "mean_measured"] == pytest.approx(-0.3)
    assert table.loc["A>0, l>0", "mean_predicted"] == pytest.approx(-0.15)
    assert table.loc["A>0, l<0", "sign_agreement"] == pytest.approx(0.5)
    assert table.loc["A>0, l<0", "theory_agreement"] == pytest.approx(0.5)
    assert table.loc["A<0, l<0", "theory_agreement"] == 1.0
    assert np.isnan(table.loc["A=0", "theory_agreement"])


def test_quadrants_with_unavailable_estimator_and_runs():
    frame = tabular_records().assign(omega_logit_grad=np.nan)
    frame["method"] = np.where(frame.index % 2 == 0, "grpo", "steer")
    table = quadrants(frame, estimator="logit-grad")
    assert len(table) == 10 and table["mean_predicted"].isna().all()
    assert table.groupby("method")["share"].sum().tolist() == pytest.approx([1.0, 1.0])
    tabular = quadrants(tabular_records()).set_index("quadrant")
    # Tabular model: the softmax estimator gets the sign right almost everywhere, while the
    # quadrant rule (sign of l_a alone, ignoring the collision term) is right only mostly.
    quads = tabular.loc[["A>0, l>0", "A>0, l<0", "A<0, l>0", "A<0, l<0"]]
    assert (quads["sign_agreement"] > 0.95).all()
    assert (quads["theory_agreement"] > 0.75).all()


# --- run comparison ------------------------------------------------------------------


def make_metrics(
    method: str, seed: int, entropy: np.ndarray, reward: np.ndarray | None = None
) -> pd.DataFrame:
    steps = np.arange(len(entropy))
    reward = np.linspace(0, 1, len(entropy)) if reward is None else reward
    return pd.DataFrame(
        {"step": steps, "entropy/mean": entropy, "reward/mean": reward, "method": method, "seed": seed}
    )


def test_final_is_tail_mean_and_step_change_is_mean_abs_diff():
    entropy = np.array(
        [1.0, 0.8, 0.9, 0.5, 0.4, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.2]
    )
    row = run_summary(make_metrics("grpo", 0, entropy)).iloc[0]
    assert row["initial_entropy"] == 1.0
    assert row["final_entropy"] == pytest.approx(0.1)  # last 10% of 20 steps: mean(0.0, 0.2)
    assert row["mean_abs_entropy_step"] == pytest.approx(np.abs(np.diff(entropy)).mean())
    assert row["initial_reward"] == 0.0 and row["final_reward"] == pytest.approx((18 / 19 + 1) / 2)


def test_identical_seeds_have_zero_ci_and_known_seeds_match_scipy():
    entropy = np.linspace(1.0, 0.5, 10)
    same = pd.concat([make_metrics("grpo", s, entropy) for s in (0, 1)], ignore_index=True)
    row = compare_runs(same).iloc[0]
    assert row["n_seeds"] == 2 and row["final_entropy_ci"] == 0.0
    finals = np.array([0.2, 0.5, 0.35])
    runs = [make_metrics("steer", s, np.array([1.0, f])) for s, f in enumerate(finals)]
    row = compare_runs(pd.concat(runs, ignore_index=True)).iloc[0]
    low, high = stats.t.interval(0.95, len(finals) - 1, loc=finals.mean(), scale=stats.sem(finals))
    assert row["final_entropy"] == pytest.approx(finals.mean())
    assert row["final_entropy_ci"] == pytest.approx((high - low) / 2)
    assert np.isnan(compare_runs(make_metrics("one", 0, entropy)).iloc[0]["final_entropy_ci"])


def test_compare_with_evals_and_defaults():
    metrics = pd.concat(
        [make_metrics("grpo", 0, np.ones(5)), make_metrics("steer", 0, np.ones(5))], ignore_index=True
    )
    evals = pd.DataFrame(
        {
            "step": [0, 4, 0, 4],
            "eval/accuracy": [0.5, 0.4, 0.2, 0.6],
            "eval/pass@1": [0.5, 0.4, 0.2, 0.6],
            "eval/pass@8": [0.7, 0.8, 0.5, 0.9],
            "method": ["grpo", "grpo", "steer", "steer"],
            "seed": 0,
        }
    )
    table = compare_runs(metrics, evals).set_index("method")
    assert table.loc["grpo", "best_accuracy"] == 0.5 and table.loc["grpo", "final_accuracy"] == 0.4
    assert table.loc["steer", "final_pass@8"] == 0.9
    assert {"final_pass@1", "final_pass@1_ci", "mean_abs_entropy_step"} <= set(table.columns)
    bare = compare_runs(pd.DataFrame({"step": [0, 1], "entropy/mean": [1.0, 0.5]}))
    assert bare.iloc[0]["method"] == "run" and bare.iloc[0]["final_entropy"] == 0.5


def test_curves_mean_and_interval_per_step():
    a, b = make_metrics("grpo", 0, np.array([1.0, 0.8])), make_metrics("grpo", 1, np.array([0.6, 0.4]))
    table = curves(pd.concat([a, b, make_metrics("steer", 0, np.array([1.0, 1.0]))]), "entropy/mean")
    grpo = table[table["method"] == "grpo"].set_index("step")
    assert grpo.loc[0, "mean"] == pytest.approx(0.8) and grpo.loc[0, "n_seeds"] == 2
    half = stats.t.ppf(0.975, 1) * np.std([1.0, 0.6], ddof=1) / np.sqrt(2)
    assert grpo.loc[0, "ci"] == pytest.approx(half)
    assert grpo.loc[0, "upper"] == pytest.approx(0.8 + half)
    assert table[table["method"] == "steer"]["ci"].isna().all()
    assert t_interval(np.array([np.nan, 2.0, 2.0])) == (2.0, 0.0)


def test_entropy_tracking_error_is_the_second_half_mean_gap_to_the_target():
    entropy = np.array([0.9, 0.7, 0.5, 0.3, 0.1, 0.2])
    metrics = make_metrics("grpo", 0, entropy).assign(**{"entropy/target": 0.25})
    row = run_summary(metrics).iloc[0]
    # second half: steps 3, 4, 5 -> |0.3-0.25|, |0.1-0.25|, |0.2-0.25| = 0.05, 0.15, 0.05
    assert row["entropy_tracking_error"] == pytest.approx((0.05 + 0.15 + 0.05) / 3)
    assert "entropy_tracking_error" not in run_summary(make_metrics("grpo", 0, entropy)).columns


def test_summary_median_per_update_and_zero_advantage_columns_match_scipy():
    rng = np.random.default_rng(3)
    n = 60
    frame = pd.DataFrame({"step": np.repeat([1, 2, 3], n // 3), "update": 0})
    frame["advantage"] = np.where(np.arange(n) % 3 == 0, 0.0, rng.normal(size=n))
    frame["delta_entropy"] = rng.normal(size=n)
    zero = frame["advantage"].to_numpy() == 0
    frame["omega_paper"] = np.where(zero, 0.0, frame["delta_entropy"] + rng.normal(size=n))
    frame["omega_jvp"] = frame["delta_entropy"] + 0.3 * rng.normal(size=n)
    out = tightness_summary(frame).set_index("estimator")
    for name, column in (("paper", "omega_paper"), ("jvp", "omega_jvp")):
        per = [stats.pearsonr(g[column], g["delta_entropy"])[0] for _, g in frame.groupby("step")]
        assert out.loc[name, "updates"] == 3
        assert out.loc[name, "pearson_update_median"] == pytest.approx(np.median(per), rel=1e-12)
    assert out.loc["jvp", "n_zero_advantage"] == zero.sum() == out.loc["paper", "n_zero_advantage"]
    expected = stats.spearmanr(frame.loc[zero, "omega_jvp"], frame.loc[zero, "delta_entropy"])[0]
    assert out.loc["jvp", "spearman_zero_advantage"] == pytest.approx(expected, rel=1e-12)
    assert np.isnan(out.loc["paper", "spearman_zero_advantage"])  # a closed form is 0 at A = 0
    # The pooled statistics are those of tightness(by=()), unchanged.
    pooled = tightness(frame, by=()).set_index("estimator")
    assert out.loc["jvp", "pearson"] == pooled.loc["jvp", "pearson"]
    bare = tightness_summary(frame.drop(columns=["step", "update", "advantage"]))
    assert bare[["updates", "n_zero_advantage", "pearson_update_median"]].isna().all().all()
