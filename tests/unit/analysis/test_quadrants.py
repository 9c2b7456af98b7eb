"""Where the quadrant rule -sign(A l_a) and the softmax estimator disagree, on hand-built tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from entropy_lab.analyses import quadrants
from entropy_lab.theory import TokenQuantities, get_estimator

ETA = 1e-4


def _entropy(z: np.ndarray) -> float:
    logp = z - np.logaddexp.reduce(z)
    return float(-(np.exp(logp) * logp).sum())


def token_row(pi, a: int, advantage: float, clip: float = 1.0) -> dict:
    """One traced token of a free-logit state pi, with the exact change of one SGD step on -w log pi_a."""
    pi = np.asarray(pi, dtype=float)
    logp = np.log(pi)
    h = float(-(pi * logp).sum())
    l_all = logp + h
    collision = float((pi**2 * l_all).sum())
    weight = clip * advantage  # r = 1, lambda = 1, N = 1
    dz = ETA * weight * (np.eye(len(pi))[a] - pi)  # minus eta times dLoss/dz
    q = TokenQuantities(
        logprob=torch.tensor([logp[a]], dtype=torch.float64),
        entropy=torch.tensor([h], dtype=torch.float64),
        collision=torch.tensor([collision], dtype=torch.float64),
        advantage=torch.tensor([advantage], dtype=torch.float64),
        old_logprob=torch.tensor([logp[a]], dtype=torch.float64),
        clip_indicator=clip,
        lr=ETA,
    )
    return {
        "advantage": advantage,
        "logprob": logp[a],
        "entropy_before": h,
        "collision": collision,
        "prob": pi[a],
        "delta_entropy": _entropy(logp + dz) - h,
        "omega_softmax": float(get_estimator("softmax")(q)[0]),
    }


PI = (0.5, 0.4, 0.1)  # H = 0.943: l = (+0.250, +0.027, -1.359), C = 0.053


def hand_built() -> pd.DataFrame:
    rows = [
        token_row(PI, 1, +1.0),  # A>0, l>0; pi_a l_a = 0.011 < C: rule says falls, it rises
        token_row(PI, 0, +1.0),  # A>0, l>0; pi_a l_a = 0.125 > C: agree
        token_row(PI, 2, +1.0),  # A>0, l<0: agree
        token_row(PI, 1, -1.0),  # A<0, l>0: rule says rises, it falls
        token_row(PI, 0, -1.0),  # A<0, l>0: agree
        token_row(PI, 2, -1.0),  # A<0, l<0: agree
        token_row(PI, 1, +1.0, clip=0.0),  # clipped: no first-order change, no sign to compare
        token_row(PI, 1, 0.0),  # A = 0
    ]
    return pd.DataFrame(rows)


def test_disagreement_share_per_quadrant_on_known_tokens():
    frame = hand_built()
    pa_la = frame["prob"] * (frame["logprob"] + frame["entropy_before"])
    # the derived condition: disagreement exactly where l_a > 0 and pi_a l_a < C
    assert (pa_la < frame["collision"]).tolist()[:2] == [True, False]
    # the exact SGD step confirms softmax's sign, against the rule, on the two disagreeing tokens
    assert frame.loc[0, "delta_entropy"] > 0 and frame.loc[0, "omega_softmax"] > 0
    assert frame.loc[3, "delta_entropy"] < 0 and frame.loc[3, "omega_softmax"] < 0
    assert frame.loc[6, "omega_softmax"] == 0.0
    table = quadrants(frame).set_index("quadrant")
    assert table["count"].tolist() == [3, 1, 2, 1, 1]
    assert table.loc["A>0, l>0", "softmax_disagreement"] == pytest.approx(
        0.5
    )  # the clipped token is left out
    assert table.loc["A>0, l<0", "softmax_disagreement"] == 0.0
    assert table.loc["A<0, l>0", "softmax_disagreement"] == pytest.approx(0.5)
    assert table.loc["A<0, l<0", "softmax_disagreement"] == 0.0
    assert np.isnan(table.loc["A=0", "softmax_disagreement"])
    # the column is the softmax estimator's, whichever estimator the table averages
    paper = quadrants(frame.assign(omega_paper=0.0), estimator="paper").set_index("quadrant")
    assert paper["softmax_disagreement"].equals(table["softmax_disagreement"])
    assert (
        quadrants(frame.drop(columns="omega_softmax").assign(omega_paper=1.0), estimator="paper")[
            "softmax_disagreement"
        ]
        .isna()
        .all()
    )


def test_tokens_below_average_likelihood_never_disagree_and_the_others_follow_the_collision_rule():
    # C = Cov_pi(pi_k, l_k) >= 0, so l_a < 0 always agrees; for l_a > 0 the rule fails iff pi_a l_a < C.
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(600):
        z = rng.normal(scale=rng.uniform(0.3, 3.0), size=int(rng.integers(3, 12)))
        pi = np.exp(z - np.logaddexp.reduce(z))
        rows.append(token_row(pi, int(rng.choice(len(pi), p=pi)), float(rng.choice([-1.0, 1.0]))))
    frame = pd.DataFrame(rows)
    assert (frame["collision"] >= -1e-15).all()
    table = quadrants(frame).set_index("quadrant")
    assert table.loc["A>0, l<0", "softmax_disagreement"] == 0.0
    assert table.loc["A<0, l<0", "softmax_disagreement"] == 0.0
    l_a = frame["logprob"] + frame["entropy_before"]
    for label, sign in (("A>0, l>0", 1.0), ("A<0, l>0", -1.0)):
        inside = (np.sign(frame["advantage"]) == sign) & (l_a >= 0)
        expected = float((frame["prob"] * l_a < frame["collision"])[inside].mean())
        assert table.loc[label, "softmax_disagreement"] == pytest.approx(expected)
    disagreeing = table.loc[["A>0, l>0", "A<0, l>0"], "softmax_disagreement"]
    assert (disagreeing > 0).all()  # the case is not vacuous
