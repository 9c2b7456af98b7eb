"""The intervention-weight table against a hand-built case."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entropy_lab.analyses import intervention_weight_summary


def test_hand_case():
    w = [0.8, 1.0, 1.2, 0.9, np.nan]
    dh = [-0.3, 0.0, 0.1, -0.1, 0.5]
    row = intervention_weight_summary(pd.DataFrame({"intervention_weight": w, "delta_entropy": dh})).iloc[0]
    assert row["n"] == 4  # the NaN weight is left out
    assert row["mean_weight"] == pytest.approx(0.975)
    assert row["share_damped"] == pytest.approx(0.5) and row["share_boosted"] == pytest.approx(0.25)
    assert row["pearson_weight_dH"] == pytest.approx(
        np.corrcoef([0.8, 1.0, 1.2, 0.9], [-0.3, 0, 0.1, -0.1])[0, 1]
    )
    # |dH| = 0.3, 0, 0.1, 0.1 ranks 4, 1, 2.5, 2.5 against w ranks 1, 3, 4, 2
    ranks_w, ranks_a = [1, 3, 4, 2], [4, 1, 2.5, 2.5]
    assert row["spearman_weight_abs_dH"] == pytest.approx(np.corrcoef(ranks_w, ranks_a)[0, 1])
    assert row["mean_dH_damped"] == pytest.approx(-0.2) and row["mean_dH_rest"] == pytest.approx(0.05)


def test_constant_or_missing_weights_give_no_table():
    assert intervention_weight_summary(pd.DataFrame({"delta_entropy": [0.1]})) is None
    flat = pd.DataFrame({"intervention_weight": [1.0, 1.0], "delta_entropy": [0.1, -0.1]})
    assert intervention_weight_summary(flat) is None


def test_runs_are_kept_apart():
    df = pd.DataFrame(
        {
            "run": ["a", "a", "b", "b"],
            "intervention_weight": [0.5, 1.5, 1.0, 2.0],
            "delta_entropy": [0.1, 0.2, 0.3, 0.4],
        }
    )
    t = intervention_weight_summary(df)
    assert list(t["run"]) == ["a", "b"]
    assert list(t["mean_weight"]) == [1.0, 1.5]
