"""The linear-regime tables against hand-built sweeps whose Pearson, gain and shares are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from entropy_lab.analyses import has_sweep, regime_shares, regime_table, regime_tightness, sweep_long
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import regime_column

ETAS = (0.25, 1.0, 2.0)
N = 200
GAIN = 3.0  # the measured change is GAIN times eta * omega_logit_grad to first order
CURVATURE = 0.4  # plus CURVATURE * eta^2 * q, q a fixed random pattern: the second order
COUPLING = 0.7  # the first order along the actual logit change is COUPLING * GAIN * eta * omega_logit_grad


def swept_records(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    omega = rng.normal(size=N)
    q = rng.normal(size=N)
    cols: dict[str, np.ndarray] = {
        "delta_entropy": GAIN * omega,
        "omega_logit_grad": omega,
        "omega_softmax": omega + rng.normal(scale=0.5, size=N),
        "omega_jvp_entropy": rng.normal(size=N),  # recomputed per eta: must not be scaled by eta
    }
    for eta in ETAS:
        cols[regime_column(eta, "delta_entropy")] = GAIN * eta * omega + CURVATURE * eta**2 * q
        cols[regime_column(eta, "delta_logit_linear")] = COUPLING * GAIN * eta * omega
        cols[regime_column(eta, "jvp_entropy")] = GAIN * eta * omega
    cols["omega_softmax"][3] = np.nan  # one missing prediction drops that token for softmax alone
    return pd.DataFrame(cols)


def _lstsq_gain(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.lstsq(x[:, None], y, rcond=None)[0][0])


def test_tightness_per_eta_matches_scipy_and_least_squares():
    records = swept_records()
    table = regime_tightness(records).set_index(["eta", "estimator"])
    assert list(table.index.get_level_values("eta").unique()) == sorted(ETAS)
    assert set(table.index.get_level_values("estimator")) == {"logit-grad", "softmax", "jvp-entropy"}
    for eta in ETAS:
        dh = records[regime_column(eta, "delta_entropy")].to_numpy()
        for name, pred in (
            ("logit-grad", eta * records["omega_logit_grad"].to_numpy()),
            ("softmax", eta * records["omega_softmax"].to_numpy()),
            ("jvp-entropy", records[regime_column(eta, "jvp_entropy")].to_numpy()),
        ):
            ok = np.isfinite(pred)
            row = table.loc[(eta, name)]
            assert row["pearson"] == pytest.approx(stats.pearsonr(pred[ok], dh[ok])[0], rel=1e-12)
            assert row["gain"] == pytest.approx(_lstsq_gain(dh[ok], pred[ok]), rel=1e-10)
    # logit-grad: exact in scale as eta -> 0, curvature pulls its Pearson down as eta grows
    logit_grad = table.xs("logit-grad", level="estimator")
    assert logit_grad["gain"].iloc[0] == pytest.approx(GAIN, rel=0.05)
    assert logit_grad["pearson"].is_monotonic_decreasing


def test_shares_are_the_known_curvature_and_coupling():
    records = swept_records()
    shares = regime_shares(records).set_index("eta")
    for eta in ETAS:
        dh = records[regime_column(eta, "delta_entropy")].to_numpy()
        lin = records[regime_column(eta, "delta_logit_linear")].to_numpy()
        lg = eta * records["omega_logit_grad"].to_numpy()
        norm = (dh**2).sum()
        assert shares.loc[eta, "curvature"] == pytest.approx(((dh - lin) ** 2).sum() / norm, rel=1e-12)
        assert shares.loc[eta, "coupling_raw"] == pytest.approx(((lin - lg) ** 2).sum() / norm, rel=1e-12)
        # the calibrated coupling removes the scale COUPLING * GAIN exactly: nothing is left
        assert shares.loc[eta, "logit_grad_gain"] == pytest.approx(COUPLING * GAIN, rel=1e-12)
        assert shares.loc[eta, "coupling_calibrated"] == pytest.approx(0.0, abs=1e-20)
    assert shares["curvature"].is_monotonic_increasing  # O(eta^2) against O(eta): grows with eta


def test_regime_table_is_both_tables_and_needs_a_sweep():
    records = swept_records()
    tightness, shares = regime_table(records)
    pd.testing.assert_frame_equal(tightness, regime_tightness(records))
    pd.testing.assert_frame_equal(shares, regime_shares(records))
    assert list(tightness.columns) == ["eta", "estimator", "pearson", "gain"]
    assert has_sweep(records) and not has_sweep(records[["delta_entropy", "omega_softmax"]])
    long = sweep_long(records)
    assert len(long) == len(ETAS) * N and list(long.columns) == [
        "token", "eta", "delta_entropy", "delta_logit_linear", "jvp_entropy",
    ]  # fmt: skip
    with pytest.raises(EntropyLabError, match="--eta-sweep"):
        sweep_long(pd.DataFrame({"delta_entropy": [0.0]}))


def test_shares_without_logit_grad_hold_curvature_only():
    records = swept_records().drop(columns=["omega_logit_grad"])
    assert list(regime_shares(records).columns) == ["eta", "curvature"]
