"""The commands, in-process with typer's CliRunner, on a tiny policy saved to disk."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from entropy_lab.cli.app import app
from entropy_lab.methods import METHODS
from entropy_lab.models import build_tiny_policy
from entropy_lab.tasks import get_task
from entropy_lab.tokenizer import build_char_tokenizer

runner = CliRunner()
SETS = [
    "--set",
    "prompts_per_step=4",
    "--set",
    "samples_per_prompt=4",
    "--set",
    "max_new_tokens=4",
    "--set",
    "eval_prompts=8",
    "--set",
    "eval_k=2",
    "--set",
    "eval_every=1",
    "--set",
    "trace_every=1",
    "--set",
    "checkpoint_every=2",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_args(model_dir, out):
    """`entropy-lab train` on the tiny policy and the fast task, two steps."""
    return [
        "train",
        "--method",
        "grpo",
        "--task",
        "arithmetic",
        "--model",
        model_dir,
        "--steps",
        2,
        *SETS,
        "--out",
        out,
        "--quiet",
    ]


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_policy_dir, digit_reward):
    mp = pytest.MonkeyPatch()
    from entropy_lab.tasks.arithmetic import ArithmeticTask

    mp.setattr(ArithmeticTask, "reward", digit_reward)
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(*train_args(tiny_policy_dir, out))
    mp.undo()
    assert result.exit_code == 0, result.output
    return out


def test_methods_lists_the_catalogue():
    result = invoke("methods")
    assert result.exit_code == 0
    for name in METHODS:
        assert name in result.output
    fields = invoke("methods", "--fields")
    assert "steer_lambda_min" in fields.output and "clip_eps_high" in fields.output


def test_train_writes_a_run_and_refuses_to_overwrite(trained_run, tiny_policy_dir):
    assert (trained_run / "config.json").is_file()
    assert len(pd.read_parquet(trained_run / "metrics.parquet")) == 2
    assert sorted(p.name for p in (trained_run / "traces").iterdir()) == [
        "step_000001.parquet",
        "step_000002.parquet",
    ]
    again = invoke(*train_args(tiny_policy_dir, trained_run))
    assert_one_line_error(again, "already holds a run", "--overwrite")


def test_trace_analyses_existing_traces(trained_run):
    result = invoke("trace", "--run", trained_run)
    assert result.exit_code == 0, result.output
    for name in ("paper", "softmax", "logit-grad", "covariance", "quadrants", "decomposition"):
        assert name in result.output
    assert (trained_run / "report.md").is_file()
    assert (trained_run / "figures" / "measured_vs_predicted.png").stat().st_size > 0
    js = invoke("trace", "--run", trained_run, "--format", "json")
    data = json.loads(js.output)
    assert {row["estimator"] for row in data["tightness"]} == {
        "paper",
        "sampled-logit",
        "softmax",
        "logit-grad",
        "covariance",
        "paper-appendix",
    }


def test_trace_from_a_checkpoint(trained_run, dense_reward):
    result = invoke("trace", "--run", trained_run / "checkpoints" / "step_000002")
    assert result.exit_code == 0, result.output
    retrace = trained_run / "retrace" / "step_000002"
    assert (retrace / "traces" / "step_000003.parquet").is_file()  # the update after the checkpoint
    assert not (trained_run / "traces" / "step_000003.parquet").exists()  # the run's traces stay training's
    other = invoke("trace", "--run", trained_run, "--step", 2, "--method", "steer", "--format", "json")
    assert other.exit_code == 0, other.output
    assert json.loads(other.output[other.output.index("{") :])["run"].endswith("retrace/step_000002-steer")


def test_figures_rebuilds_from_records(trained_run, tmp_path):
    shutil.rmtree(trained_run / "figures", ignore_errors=True)
    result = invoke("figures", "--run", trained_run, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    assert (trained_run / "figures" / "training_curves.png").is_file()
    assert (tmp_path / "cmp" / "report.md").is_file()


def test_compare_trains_then_reuses(tmp_path, tiny_policy_dir, dense_reward):
    args = [
        "compare",
        "grpo",
        "steer",
        "--steps",
        2,
        "--task",
        "arithmetic",
        "--model",
        tiny_policy_dir,
        *SETS,
        "--out",
        tmp_path,
        "--quiet",
    ]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "grpo" in first.output and "steer" in first.output
    assert (tmp_path / "report.md").is_file() and (tmp_path / "steer-s0" / "report.md").is_file()
    second = invoke(*args)
    assert second.exit_code == 0 and second.output.count("reusing") == 2


def test_bad_input_gives_one_line(tmp_path, trained_run, tiny_policy_dir):
    assert_one_line_error(invoke("trace", "--run", tmp_path / "nope"), "no run or checkpoint directory")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert_one_line_error(invoke("trace", "--run", tmp_path / "bad"), "malformed")
    assert_one_line_error(invoke("train", "--method", "nope"), "unknown method", "steer")
    assert_one_line_error(invoke("train", "--set", "lrr=1"), "unknown config key", "lr")
    assert_one_line_error(invoke("train", "--set", "lr=fast"), "expects float")
    assert_one_line_error(invoke("compare", "grpo", "nope"), "unknown method")
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    for f in (broken / "traces").glob("*.parquet"):
        pd.read_parquet(f).drop(columns=["omega_softmax"]).to_parquet(f)
    assert_one_line_error(invoke("figures", "--run", broken), "omega_softmax")


def test_checkpoint_with_a_foreign_tokenizer(tmp_path, trained_run):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    shutil.copytree(trained_run, tmp_path / "run")
    big = build_char_tokenizer(get_task("countdown").alphabet() + "abcdefghijklmnopqrstuvwxyz")
    small = build_char_tokenizer(get_task("arithmetic").alphabet())
    build_tiny_policy(small).save_pretrained(ckpt / "model")
    big.save_pretrained(ckpt / "model")
    # the manifest's digests no longer match: refused before anything is loaded
    assert_one_line_error(invoke("trace", "--run", ckpt), "model/config.json is damaged")
    (ckpt / "checkpoint.json").unlink()  # a checkpoint from before manifests is loaded as it is
    assert_one_line_error(invoke("trace", "--run", ckpt), "do not belong together")


def test_methods_fields_show_the_ranges_validation_uses():
    from entropy_lab.config import field_ranges

    result = invoke("methods", "--fields")
    assert result.exit_code == 0
    assert field_ranges()["top_p"] == "(0, 1]" and "(0, 1]" in result.output
    assert field_ranges()["dual_clip_c"] == "> 1 or None"


def test_trace_from_a_checkpoint_tables_that_update_only(trained_run, tmp_path, dense_reward):
    from entropy_lab.records import load_records

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "traces" / "step_000003.parquet").unlink(missing_ok=True)  # another test traced it
    pooled = json.loads(invoke("trace", "--run", run, "--format", "json").output)
    assert pooled["scope"] == "run" and pooled["traced_steps"] == 2

    table = invoke("trace", "--run", run / "checkpoints" / "step_2")  # short for step_000002
    assert table.exit_code == 0, table.output
    assert "tables below cover one update: step 3" in table.output
    assert "report of this update" in table.output and "own traces and report are unchanged" in table.output
    js = invoke("trace", "--run", run / "checkpoints" / "step_000002", "--format", "json")
    data = json.loads(js.output[js.output.index("{") :])
    assert data["scope"] == "update" and data["traced_step"] == 3
    records, _ = load_records(data["trace"])
    n_update = {row["estimator"]: row["n"] for row in data["tightness"]}
    assert set(records["step"]) == {3}
    assert n_update["softmax"] == int(records["omega_softmax"].notna().sum()) > 0  # that file alone


def test_compare_seeds_start_at_the_given_seed_and_are_distinct():
    from entropy_lab.cli.compare import seed_configs

    cfgs = seed_configs("grpo", 3, None, None, None, None, ["seed=5", "lr=0.002"])
    assert [c.seed for c in cfgs] == [5, 6, 7] and {c.lr for c in cfgs} == {0.002}
    assert [c.seed for c in seed_configs("steer", 2, None, None, None, None, None)] == [0, 1]


@pytest.mark.slow
def test_compare_runs_k_distinct_seeds_from_the_given_one(tmp_path, tiny_policy_dir, dense_reward):
    args = ["compare", "grpo", "--seeds", 2, "--set", "seed=5", "--steps", 1, "--task", "arithmetic"]
    result = invoke(*args, "--model", tiny_policy_dir, *SETS, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("grpo-")) == ["grpo-s5", "grpo-s6"]
    for name, seed in (("grpo-s5", 5), ("grpo-s6", 6)):
        assert json.loads((tmp_path / name / "config.json").read_text())["config"]["seed"] == seed
    rows = [cells for cells in (line.split("│") for line in result.output.splitlines()) if len(cells) > 3]
    header = next(line.split("┃") for line in result.output.splitlines() if "n_seeds" in line)
    column = [c.strip() for c in header].index("n_seeds")
    assert rows[0][1].strip() == "grpo" and rows[0][column].strip() == "2", result.output  # the true count


def test_a_configuration_that_cannot_learn_is_warned_about(tmp_path, tiny_policy_dir):
    """Group size 1 is warned about before training; a run whose rewards never differ, at its end."""
    args = train_args(tiny_policy_dir, tmp_path / "run")
    args[args.index("--steps") + 1] = 1
    result = invoke(*args, "--set", "samples_per_prompt=1")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.stderr
    assert "samples_per_prompt=1" in warnings[0] and "--set samples_per_prompt=2" in warnings[0]
    assert "every advantage was 0" in warnings[1]  # the random policy never earns a reward


def test_resume_with_more_steps_records_the_new_budget(trained_run, tmp_path, dense_reward, tiny_policy_dir):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    args = train_args(tiny_policy_dir, run)
    args[args.index("--steps") + 1] = 3
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 3
    assert pd.read_parquet(run / "metrics.parquet")["step"].tolist() == [1, 2, 3]


def test_learnability_warnings_name_the_cause():
    from entropy_lab.config import TrainConfig
    from entropy_lab.trainer.learnability import outcome_warning, setting_warning

    assert setting_warning(TrainConfig(samples_per_prompt=2)) is None
    assert "samples_per_prompt=1" in setting_warning(TrainConfig(samples_per_prompt=1))
    flat = [{"advantage/zero_frac": 1.0, "reward/mean": 0.0, "reward/std": 0.0}] * 3
    assert "in all 3 steps every reward was 0" in outcome_warning(flat)
    mixed = [{"advantage/zero_frac": 1.0, "reward/mean": 0.5, "reward/std": 0.5}] * 2  # equal within groups
    assert "every group's rewards were equal" in outcome_warning(mixed)
    assert (
        outcome_warning([*flat, {"advantage/zero_frac": 0.5, "reward/mean": 0.5, "reward/std": 0.5}]) is None
    )
    assert outcome_warning([]) is None


def test_trace_from_a_checkpoint_with_jvp_records_the_jvp_estimators(trained_run, tmp_path, dense_reward):
    from entropy_lab.records import load_records

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "traces" / "step_000003.parquet").unlink(missing_ok=True)  # another test traced it
    js = invoke("trace", "--run", run, "--jvp", "--format", "json")  # latest checkpoint, not the old traces
    assert js.exit_code == 0, js.output
    data = json.loads(js.output[js.output.index("{") :])
    assert data["scope"] == "update" and data["traced_step"] == 3
    records, _ = load_records(data["trace"])
    assert {"omega_jvp", "omega_jvp_entropy"} <= set(records.columns)
    assert records["omega_jvp_entropy"].notna().all()
    assert {row["estimator"] for row in data["tightness"]} >= {"jvp", "jvp-entropy"}


def test_a_checkpoint_trace_never_changes_the_run_and_is_listed(trained_run, tmp_path, dense_reward):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "retrace", ignore_errors=True)  # another test traced from this run
    assert invoke("trace", "--run", run).exit_code == 0  # the run's own report, from training's traces
    own = {p: p.read_bytes() for p in [run / "report.md", run / "report.json", *sorted(run.glob("traces/*"))]}

    result = invoke("trace", "--run", run / "checkpoints" / "step_000002")
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in own} == own and len(list(run.glob("traces/*"))) == 2
    retrace = run / "retrace" / "step_000002"
    assert [p.name for p in (retrace / "traces").iterdir()] == ["step_000003.parquet"]
    assert (retrace / "report.md").is_file() and (retrace / "figures").is_dir()

    # an older version's folders beside the run's entries are still listed and readable
    shutil.copytree(retrace, run / "retrace-steer-step_000002")
    listed = json.loads(invoke("trace", "--run", run, "--format", "json").output)["retraces"]
    assert [(e["traced_step"], e["variant"], e["layout"]) for e in listed] == [
        (3, None, "retrace"),
        (3, None, "legacy"),
    ]
    assert listed[0]["path"] == str(retrace)
    table = invoke("trace", "--run", run)
    assert f"{retrace}  (update 3 from checkpoint 2, grpo)" in table.output
    assert "retrace-steer-step_000002  (update 3 from checkpoint 2, grpo, older layout)" in table.output
    old = invoke("trace", "--run", run / "retrace-steer-step_000002", "--format", "json")
    assert old.exit_code == 0 and json.loads(old.output)["traced_steps"] == 1


def test_trace_with_layer_attribution_tables_and_reports_the_parts(trained_run, tmp_path, dense_reward):
    from entropy_lab.records import attribution_columns, load_records

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "traces" / "step_000003.parquet").unlink(missing_ok=True)  # another test traced it
    js = invoke("trace", "--run", run, "--attribution", "layer", "--format", "json")
    assert js.exit_code == 0, js.output
    data = json.loads(js.output[js.output.index("{") :])
    records, meta = load_records(data["trace"])
    parts = attribution_columns(records.columns, "layer")
    assert {"embedding", "lm_head", "norms", "block0.attn", "block0.mlp"} <= set(parts)
    table = pd.DataFrame(data["attribution_layer"])
    assert list(table["part"]) == list(parts)
    assert table["signed_share"].sum() == pytest.approx(1.0, rel=1e-9)
    assert table["mean_abs_share"].sum() == pytest.approx(1.0, rel=1e-9)
    report = (Path(data["run"]) / "report.md").read_text()
    assert "attribution by layer" in report
    text = invoke("trace", "--run", run, "--step", "2", "--attribution", "layer")
    assert text.exit_code == 0, text.output
    assert "attribution by layer" in text.output and "lm_head" in text.output
    bad = invoke("trace", "--run", run, "--attribution", "layers")
    assert bad.exit_code == 2 and "error:" in bad.output and "valid: layer" in bad.output
