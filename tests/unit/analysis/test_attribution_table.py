"""The attribution table on hand-built records whose shares are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entropy_lab.analyses import attribution_table, has_attribution


def test_shares_on_a_hand_computed_case():
    records = pd.DataFrame(
        {
            "delta_entropy": [1.0, -2.0, 0.5],
            "attr_layer:a": [1.0, -1.0, 0.0],
            "attr_layer:b": [3.0, -1.0, 0.0],  # token 3: no part moves it
            "attr_source:own": [9.0, 9.0, 9.0],  # another kind: not in the layer table
        }
    )
    assert has_attribution(records) and not has_attribution(
        records.drop(columns=["attr_layer:a", "attr_layer:b"])
    )
    table = attribution_table(records).set_index("part")
    assert list(table.index) == ["a", "b"]
    # |part| / sum|parts| per token: a (1/4, 1/2), b (3/4, 1/2); the unmoved token has no share
    assert table.loc["a", "mean_abs_share"] == pytest.approx((0.25 + 0.5) / 2)
    assert table.loc["b", "mean_abs_share"] == pytest.approx((0.75 + 0.5) / 2)
    # summed predicted change 4 - 2 + 0 = 2: a contributes 0, b 2
    assert table.loc["a", "signed_share"] == pytest.approx(0.0) and table.loc[
        "b", "signed_share"
    ] == pytest.approx(1.0)
    assert table.loc["b", "sum"] == pytest.approx(2.0)
    expected = np.corrcoef([3.0, -1.0, 0.0], [1.0, -2.0, 0.5])[0, 1]
    assert table.loc["b", "pearson_measured"] == pytest.approx(expected)


def test_runs_are_tabled_apart_and_no_columns_give_an_empty_table():
    one = pd.DataFrame({"delta_entropy": [1.0, 2.0], "attr_layer:a": [1.0, 2.0], "attr_layer:b": [1.0, -1.0]})
    records = pd.concat([one.assign(run="x"), (one * 2).assign(run="y")], ignore_index=True)
    table = attribution_table(records)
    assert list(table.columns[:2]) == ["run", "part"] and len(table) == 4
    assert table.groupby("run")["signed_share"].sum().tolist() == pytest.approx([1.0, 1.0])
    assert attribution_table(one.drop(columns=["attr_layer:a", "attr_layer:b"])).empty
