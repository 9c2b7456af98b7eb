"""The coupling study on a tiny random policy: its token draws, one update against a hand-made
step, the table, the figure and the command, each in seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from entropy_lab.cli.app import app
from entropy_lab.errors import EntropyLabError
from entropy_lab.figures import coupling_study_figure
from entropy_lab.stats import entropy_from_logits
from entropy_lab.studies.coupling import (
    CouplingStudyConfig,
    draw_batch,
    load_policy_and_task,
    run_coupling_study,
    study_table,
    token_sets,
    wide_table,
)


def tiny_config(model_dir, **overrides) -> CouplingStudyConfig:
    settings = dict(
        tokens_per_update=(1, 3, 0),
        lrs={"sgd": (1e-3,), "adamw": (1e-4,)},
        min_tokens=6,
        task="arithmetic",
        model=str(model_dir),
        prompts=4,
        samples_per_prompt=4,
        max_new_tokens=4,
    )
    return CouplingStudyConfig(**{**settings, **overrides})


def test_token_sets_are_disjoint_draws_and_the_full_batch_once():
    sets = token_sets(10, (1, 4, 0, 25), min_tokens=6, seed=0)
    assert list(sets) == [1, 4, 10]  # 0 and 25 both mean the whole batch, kept once
    assert len(sets[1]) == 6 and len(sets[4]) == 2 and len(sets[10]) == 1
    assert torch.equal(sets[10][0], torch.arange(10))
    ones = torch.cat(sets[1])
    assert len(ones.unique()) == 6  # disjoint while the candidates last
    fours = torch.cat(sets[4])
    assert len(fours.unique()) == 8 and all(len(s) == 4 for s in sets[4])
    again = token_sets(3, (2,), min_tokens=6, seed=0)[2]  # runs out: a fresh permutation
    assert len(again) == 3 and all(len(s.unique()) == 2 for s in again)


def test_config_rejects_bad_settings():
    with pytest.raises(EntropyLabError, match="unknown optimizer"):
        CouplingStudyConfig(lrs={"lion": (1e-3,)})
    with pytest.raises(EntropyLabError, match="positive"):
        CouplingStudyConfig(lrs={"sgd": (0.0,)})
    with pytest.raises(EntropyLabError, match="tokens_per_update"):
        CouplingStudyConfig(tokens_per_update=(-1,))
    with pytest.raises(EntropyLabError, match="dtype"):
        CouplingStudyConfig(dtype="float16")


def test_all_zero_advantages_is_one_clear_error(tiny_policy_dir):
    # the random policy never solves arithmetic: every group ties at reward 0
    with pytest.raises(EntropyLabError, match="no token carries gradient"):
        run_coupling_study(tiny_config(tiny_policy_dir))


def test_single_token_sgd_update_matches_a_hand_made_step(tiny_policy_dir, dense_reward):
    lr = 1e-2
    cfg = tiny_config(tiny_policy_dir, tokens_per_update=(1,), lrs={"sgd": (lr,)}, min_tokens=3)
    records = run_coupling_study(cfg)
    assert len(records) == 3 and records["update"].tolist() == [0, 1, 2]
    assert (records["optimizer"] == "sgd").all() and (records["lr"] == lr).all()
    # the reference: the loss -A log pi(token) (ratio 1, token-mean over one token), one plain
    # SGD step by hand on a float64 copy, entropies before and after at the same position
    model, tokenizer, task = load_policy_and_task(cfg)
    batch = draw_batch(model, tokenizer, task, cfg, torch.device("cpu"))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # the records' sample column indexes the update's own sub-batch: map back through the token sets
    sets = token_sets(len(batch.rows), (1,), 3, cfg.seed)[1]
    for (_, row), tokens in zip(records.iterrows(), sets, strict=True):
        b, t = int(batch.rows[tokens[0]]), int(batch.positions[tokens[0]])
        assert int(row["position"]) == t
        model.load_state_dict(start)
        inputs = dict(
            input_ids=batch.input_ids[[b]],
            attention_mask=batch.attention_mask[[b]],
            position_ids=batch.position_ids[[b]],
        )
        logits = model(**inputs).logits[0, t - 1]  # (V,)
        advantage = float(batch.advantages[b, t])
        loss = -advantage * torch.log_softmax(logits, -1)[batch.input_ids[b, t]]
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            h_before = float(entropy_from_logits(logits.detach()))
            for p in model.parameters():
                p -= lr * p.grad
            h_after = float(entropy_from_logits(model(**inputs).logits[0, t - 1]))
        assert row["advantage"] == pytest.approx(advantage)
        assert row["entropy_before"] == pytest.approx(h_before, rel=1e-9)
        assert row["delta_entropy"] == pytest.approx(h_after - h_before, rel=1e-6, abs=1e-12)
    model.load_state_dict(start)


def test_study_table_and_figure(tiny_policy_dir, dense_reward):
    records = run_coupling_study(tiny_config(tiny_policy_dir))
    settings = records.groupby(["optimizer", "lr", "tokens_per_update"])["update"].nunique()
    n_all = int(records["tokens_per_update"].max())
    assert settings.loc[("sgd", 1e-3, 1)] == 6 and settings.loc[("sgd", 1e-3, 3)] == 2
    assert settings.loc[("adamw", 1e-4, n_all)] == 1
    table = study_table(records)
    assert {"paper", "softmax", "logit-grad"} <= set(table["estimator"])
    one = table[(table.optimizer == "sgd") & (table.tokens_per_update == 1) & (table.estimator == "softmax")]
    assert one["n"].item() == 6 and one["updates"].item() == 6
    # recompute one cell by hand: pooled Pearson and least-squares gain
    rows = records[(records.optimizer == "sgd") & (records.tokens_per_update == 1)]
    y, x = rows["delta_entropy"].to_numpy(), rows["omega_softmax"].to_numpy()
    assert one["pearson"].item() == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert one["gain"].item() == pytest.approx(np.dot(x, y) / np.dot(x, x))
    assert table["coupling_share"].notna().all()
    # the network's own first order joins the table and the four-way split
    assert {"jvp", "jvp-entropy"} <= set(table["estimator"]) and set(table["split"]) == {"jvp"}
    sgd = table[(table.optimizer == "sgd") & (table.estimator == "jvp-entropy")]
    assert (sgd["pearson"] > 0.99).all()  # tiny lr: the linearised logits carry the change
    wide = wide_table(table)
    assert len(wide) == 6 and {"r logit-grad", "rho paper", "g paper", "coupling_share_calibrated"} <= set(
        wide.columns
    )
    assert wide[["optimizer", "tokens_per_update"]].values.tolist()[:2] == [["sgd", 1], ["sgd", 3]]
    fig = coupling_study_figure(table)
    assert len(fig.axes) == 6 and fig.axes[0].get_title().startswith("sgd: Pearson")
    gains = table[table.optimizer == "sgd"]["gain"].dropna()
    assert fig.axes[4].get_yscale() == ("log" if (gains > 0).all() else "symlog")
    negative = table.assign(gain=np.where(table.estimator == "paper", -1.0, table["gain"]))
    assert coupling_study_figure(negative).axes[4].get_yscale() == "symlog"
    empty = coupling_study_figure(pd.DataFrame())
    assert all("no data" in [t.get_text() for t in ax.texts] for ax in empty.axes)


def test_study_command_writes_table_records_and_figure(tmp_path, tiny_policy_dir, dense_reward):
    out = tmp_path / "study"
    args = ["study", "coupling", "--model", tiny_policy_dir, "--task", "arithmetic", "--prompts", 4]
    args += ["--samples", 4, "--max-new-tokens", 4, "--tokens", "1,all", "--sgd-lr", "1e-3"]
    args += ["--adamw-lr", "1e-4", "--min-tokens", 4, "--out", out, "--quiet"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "coupling study" in result.output and "r logit-grad" in result.output
    for name in (
        "coupling_study.csv",
        "coupling_study.parquet",
        "coupling_records.parquet",
        "coupling_study.png",
    ):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "coupling_study.csv")
    assert set(table["optimizer"]) == {"sgd", "adamw"} and len(set(table["tokens_per_update"])) == 2
    bad = CliRunner().invoke(app, ["study", "coupling", "--tokens", "one,two"])
    assert bad.exit_code == 2 and "--tokens expects a comma-separated list" in bad.output
