"""The noise-floor study against independent references: the run's own trace of the same update,
a zero step that must change nothing, and a hand-computed table row."""

from __future__ import annotations

import numpy as np
import pytest

from entropy_lab.records import load_records
from entropy_lab.runs import RunDir
from entropy_lab.studies.noise_floor import KEY, Setting, floor_row, write_noise_floor
from entropy_lab.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_policy_dir, small_settings):
    """A 2-step tiny run with a checkpoint at step 1, tracing every step (module-scoped: seconds)."""
    from tiny_training import digit_reward, small_config

    from entropy_lab.tasks.arithmetic import ArithmeticTask

    mp = pytest.MonkeyPatch()
    mp.setattr(ArithmeticTask, "reward", digit_reward)
    out = tmp_path_factory.mktemp("nf") / "run"
    Trainer(small_config("grpo", tiny_policy_dir, checkpoint_every=1, eval_every=0), out).train()
    study = out / "nf"
    table, _ = write_noise_floor(RunDir(out), study, step=1, lrs=(1e-3,), bf16=True)
    yield out, study, table
    mp.undo()


def test_fp32_setting_reproduces_the_runs_own_trace(trained):
    out, study, _ = trained
    own = load_records(RunDir(out).trace_path(2))[0].set_index(KEY).sort_index()
    cfg_lr = RunDir(out).train_config().lr
    assert cfg_lr == 1e-3  # the study's lr is the run's: the fp32 update is the run's step 2
    ours = load_records(RunDir(study / "lr0.001-fp32").trace_path(2))[0].set_index(KEY).sort_index()
    assert ours.index.equals(own.index)
    np.testing.assert_array_equal(ours["delta_entropy"].to_numpy(), own["delta_entropy"].to_numpy())


def test_zero_step_changes_nothing_and_real_step_does(trained):
    _, _, table = trained
    t = table.set_index("setting")
    assert t.loc["zero-fp32", "max_abs_dH"] <= 1e-6
    assert t.loc["zero-bf16", "max_abs_dH"] <= 1e-6  # same weights, same code path: same entropies
    assert t.loc["lr0.001-fp32", "rms_dH"] > 100 * max(t.loc["zero-fp32", "rms_dH"], 1e-9)
    # bf16 rounding is far above fp32's floor but the bf16 change still tracks the fp32 one
    assert t.loc["lr0.001-bf16", "rms_error"] > 0
    assert t.loc["lr0.001-bf16", "pearson_vs_fp32"] > 0.5


def test_bf16_split_adds_up_to_at_least_the_total(trained):
    _, _, table = trained
    row = table.set_index("setting").loc["lr0.001-bf16"]
    # triangle inequality on RMS: total <= measurement + update
    assert row["error_share"] <= row["measurement_share"] + row["update_share"] + 1e-12


def test_floor_row_hand_case():
    s = Setting("x", 1e-3, "bf16")
    dh = np.array([0.1, -0.2, 0.3, 0.0])
    ref = np.array([0.1, -0.1, 0.3, 0.1])
    meas = np.array([0.1, -0.2, 0.2, 0.0])
    row = floor_row(s, dh, ref, meas)
    rms_ref = np.sqrt((0.01 + 0.01 + 0.09 + 0.01) / 4)
    assert row["rms_error"] == pytest.approx(np.sqrt((0.01 + 0.01) / 4))
    assert row["error_share"] == pytest.approx(np.sqrt(0.02 / 4) / rms_ref)
    assert row["measurement_share"] == pytest.approx(np.sqrt(0.01 / 4) / rms_ref)
    assert row["update_share"] == pytest.approx(np.sqrt((0.01 + 0.01 + 0.01) / 4) / rms_ref)
    assert row["sign_agreement"] == pytest.approx(0.75)
    assert row["median_abs_dH"] == pytest.approx(0.15)
