"""The calibrated decomposition on hand-built trace frames whose parts are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entropy_lab.analyses.decomposition import (
    JVP,
    SPLIT_JVP,
    SPLIT_NO_JVP,
    decompose,
    decomposition_summary,
    has_jvp,
    parts,
    update_gains,
)
from entropy_lab.errors import EntropyLabError


def random_frame(n: int = 300, seed: int = 0, jvp: bool = True) -> pd.DataFrame:
    """Unrelated random columns over three updates: only the identity can hold."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "step": np.repeat([1, 1, 2], n // 3),
            "update": np.repeat([0, 1, 0], n // 3),
            "delta_entropy": rng.normal(size=n),
            "delta_logit_linear": rng.normal(size=n),
            "omega_logit_grad": rng.normal(size=n) * 1e-3,
            "omega_softmax": rng.normal(size=n) * 1e-3,
            "omega_paper": rng.normal(size=n) * 1e-3,
        }
    )
    if jvp:
        frame[JVP] = rng.normal(size=n)
    return frame


def scale_off_frame(scales=(1e-4, 1e-3), n: int = 200, seed: int = 1) -> pd.DataFrame:
    """The pattern of every estimator is exact; the tabular ones are too small by 1e4 and 1e3 (as under Adam)."""
    rng = np.random.default_rng(seed)
    frames = []
    for update, scale in enumerate(scales):
        dh = rng.normal(size=n) * 1e-3
        frames.append(
            pd.DataFrame(
                {
                    "step": 3,
                    "update": update,
                    "delta_entropy": dh,
                    "delta_logit_linear": dh,
                    JVP: dh,
                    "omega_logit_grad": dh * scale,
                    "omega_paper": dh * scale,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("jvp", [True, False])
@pytest.mark.parametrize("calibrated", [True, False])
def test_parts_sum_to_the_measured_change_per_token(jvp, calibrated):
    frame = random_frame(jvp=jvp)
    out = decompose(frame, calibrated=calibrated)
    names = ["omega_logit_grad", "coupling", "curvature"] + (["nonlinearity"] if jvp else [])
    rebuilt = out[names].sum(axis=1)
    assert np.max(np.abs(rebuilt - frame["delta_entropy"])) < 1e-12
    assert ("nonlinearity" in out.columns) == jvp
    assert list(out.index) == list(frame.index)
    if jvp:
        assert np.allclose(out["nonlinearity"], frame["delta_logit_linear"] - frame[JVP])
    assert np.allclose(out["curvature"], frame["delta_entropy"] - frame["delta_logit_linear"])


def test_calibration_uses_each_updates_own_gain():
    frame = random_frame()
    out = decompose(frame, calibrated=True)
    for _, rows in frame.groupby(["step", "update"]):
        y, x = rows["delta_entropy"].to_numpy(), rows["omega_logit_grad"].to_numpy()
        gain = (y * x).sum() / (x * x).sum()  # naive least squares through the origin
        assert np.allclose(out.loc[rows.index, "gain"], gain)
        assert np.allclose(out.loc[rows.index, "omega_logit_grad"], gain * x)
        fitted = gain * x
        assert abs(np.dot(y - fitted, x)) < 1e-9  # the residual is orthogonal to the prediction


def test_exact_pattern_with_wrong_scale_is_all_coupling_raw_and_none_calibrated():
    frame = scale_off_frame()
    table = decomposition_summary(frame, by=()).set_index("part")
    assert set(table["split"]) == {SPLIT_JVP}
    assert table.loc["coupling", "share"] == pytest.approx(1.0, rel=1e-3)  # raw: scale looks like coupling
    assert table.loc["coupling", "share_calibrated"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["omega_logit_grad", "share_calibrated"] == pytest.approx(1.0)
    for part in ("nonlinearity", "curvature", "omission"):
        assert table.loc[part, "share_calibrated"] == pytest.approx(0.0, abs=1e-9)
    # median over the two updates of gains 1e4 and 1e3
    assert table.loc["omega_logit_grad", "gain"] == pytest.approx(np.median([1e4, 1e3]))
    assert table.loc[JVP, "gain"] == pytest.approx(1.0)
    # One gain pooled over both updates cannot fix two different scales: per-update it must be.
    pooled_gain = np.dot(frame.delta_entropy, frame.omega_logit_grad) / np.dot(
        frame.omega_logit_grad, frame.omega_logit_grad
    )
    pooled_residual = np.abs(frame.delta_entropy - pooled_gain * frame.omega_logit_grad).sum()
    assert pooled_residual / np.abs(frame.delta_entropy).sum() > 0.4
    three_way = decomposition_summary(frame.drop(columns=JVP), by=()).set_index("part")
    assert three_way.loc["coupling", "share"] == pytest.approx(1.0, rel=1e-3)
    assert three_way.loc["coupling", "share_calibrated"] == pytest.approx(0.0, abs=1e-9)


def test_hand_computed_shares_four_way():
    frame = pd.DataFrame(
        {
            "delta_entropy": [1.0, -2.0],
            "delta_logit_linear": [0.5, -1.0],
            JVP: [0.5, -0.5],
            "omega_logit_grad": [0.25, -0.25],
            "omega_paper": [0.5, 0.5],
        }
    )
    # g = (0.25 + 0.5) / 0.125 = 6; g_paper = (0.5 - 1) / 0.5 = -1. Sum |dH| = 3.
    # calibrated: tabular (1.5, -1.5), coupling (-1, 1), nonlinearity (0, -0.5),
    # curvature (0.5, -1), omission (1.5 + 0.5, -1.5 + 0.5) = (2, -1).
    # raw: tabular (0.25, -0.25), coupling (0.25, -0.25), omission (-0.25, -0.75).
    table = decomposition_summary(frame, by=()).set_index("part")
    assert list(table.index) == parts("logit-grad", jvp=True)
    expected_calibrated = {
        "delta_entropy": (-1.0, 1.0),
        "omega_logit_grad": (0.0, 1.0),
        JVP: (0.0, 1.0 / 3),
        "coupling": (0.0, 2.0 / 3),
        "nonlinearity": (-0.5, 0.5 / 3),
        "curvature": (-0.5, 0.5),
        "omission": (1.0, 1.0),
    }
    expected_raw = {
        "omega_logit_grad": (0.0, 0.5 / 3),
        "coupling": (0.0, 0.5 / 3),
        "omission": (-1.0, 1.0 / 3),
    }
    for part, (total, share) in expected_calibrated.items():
        assert table.loc[part, "sum_calibrated"] == pytest.approx(total, abs=1e-12), part
        assert table.loc[part, "share_calibrated"] == pytest.approx(share), part
    for part, (total, share) in expected_raw.items():
        assert table.loc[part, "sum"] == pytest.approx(total, abs=1e-12), part
        assert table.loc[part, "share"] == pytest.approx(share), part
    assert table.loc["omega_logit_grad", "gain"] == pytest.approx(6.0)
    assert table.loc["omission", "gain"] == pytest.approx(-1.0)
    assert np.isnan(table.loc["coupling", "gain"])


def test_falls_back_to_three_way_and_says_so():
    frame = random_frame(jvp=False)
    assert not has_jvp(frame) and not has_jvp(frame.assign(**{JVP: np.nan}))
    for records in (frame, frame.assign(**{JVP: np.nan})):
        table = decomposition_summary(records, by=())
        assert list(table["part"]) == parts("logit-grad", jvp=False)
        assert set(table["split"]) == {SPLIT_NO_JVP}
    table = decomposition_summary(frame.assign(**{JVP: 0.0}), by=())
    assert set(table["split"]) == {SPLIT_JVP} and "nonlinearity" in set(table["part"])
    with pytest.raises(EntropyLabError, match="omega_jvp"):
        decompose(frame, jvp=True)


def test_all_zero_update_has_no_gain_and_predicts_zero():
    frame = pd.DataFrame(
        {
            "update": [0, 0, 1, 1],
            "delta_entropy": [0.1, -0.2, 0.3, 0.4],
            "delta_logit_linear": [0.1, -0.1, 0.2, 0.2],
            "omega_logit_grad": [0.0, 0.0, 1.0, 2.0],
            "omega_paper": [0.0, 0.0, 1.0, 2.0],
        }
    )
    out = decompose(frame, calibrated=True)
    assert out.loc[:1, "gain"].isna().all()
    assert (out.loc[:1, "omega_logit_grad"] == 0).all()
    assert np.allclose(out.loc[:1, "coupling"], [0.1, -0.1])
    assert np.allclose(out.loc[2:, "gain"], (0.3 + 0.8) / 5)
    gains = update_gains(frame, ["logit-grad"])
    assert np.isnan(gains.loc[0, "gain"]) and gains.loc[1, "gain"] == pytest.approx(0.22)


def test_summary_pools_additively_and_skips_nan_tokens():
    frame = random_frame()
    frame.loc[5, JVP] = np.nan
    frame.loc[7, "omega_paper"] = np.nan
    per_step = decomposition_summary(frame)
    pooled = decomposition_summary(frame, by=())
    assert set(per_step["step"]) == {1, 2}
    for column in ("sum", "sum_abs", "sum_calibrated", "sum_abs_calibrated"):
        repooled = per_step.groupby("part", sort=False)[column].sum()
        assert np.allclose(repooled.to_numpy(), pooled.set_index("part")[column].loc[repooled.index])
    n = pooled.set_index("part")["n"]
    assert n["delta_entropy"] == len(frame) - 1 and n["omission"] == len(frame) - 2
    runs = pd.concat([frame.assign(run="a"), frame.assign(run="b")], ignore_index=True)
    split = decomposition_summary(runs, by=())
    assert list(split.columns[:1]) == ["run"] and len(split) == 2 * len(pooled)


def test_update_gains_cover_every_omega_column():
    frame = random_frame()
    gains = update_gains(frame)
    assert set(gains["column"]) == {"omega_logit_grad", "omega_softmax", "omega_paper", JVP}
    assert len(gains) == 3 * 4
    row = gains[(gains.step == 2) & (gains.column == JVP)].iloc[0]
    part = frame[frame.step == 2]
    assert row["gain"] == pytest.approx(np.dot(part.delta_entropy, part[JVP]) / np.dot(part[JVP], part[JVP]))
    with pytest.raises(EntropyLabError, match="Unknown estimator"):
        update_gains(frame, ["nope"])


def test_decomposition_figure_shows_raw_and_calibrated_shares_and_names_the_split():
    from entropy_lab.figures import decomposition_bar

    four = decomposition_bar(decomposition_summary(scale_off_frame()))
    assert len(four.axes) == 2 and "four-way" in four._suptitle.get_text()
    raw_ax, cal_ax = four.axes
    ticks = [t.get_text() for t in cal_ax.get_xticklabels()]
    assert ticks[:3] == ["measured ΔH", "ω logit-grad", "ω jvp (network)"]
    coupling = ticks.index("coupling")
    assert raw_ax.patches[coupling].get_height() == pytest.approx(1.0, rel=1e-3)
    assert cal_ax.patches[coupling].get_height() == pytest.approx(0.0, abs=1e-9)
    assert "median g = 5.5e+03" in cal_ax.get_title()
    three = decomposition_bar(decomposition_summary(random_frame(jvp=False)))
    assert "three-way" in three._suptitle.get_text()
    empty = decomposition_bar(decomposition_summary(random_frame().iloc[0:0]))
    assert all("no data" in [t.get_text() for t in ax.texts] for ax in empty.axes)
