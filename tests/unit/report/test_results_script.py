"""scripts/results.py on synthetic run directories: docs/results.md and the README block come from report.json.

The runs are the known-by-construction ones of ``test_report`` (dH = GAIN * omega_softmax,
coupling and curvature shares 0.25 ...), reported by ``run_report`` and ``compare_report``.
The references are the DataFrames those functions return, never the script's own output;
cells are compared at the 3 significant digits the page shows.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import GAIN, make_run, table_column

from entropy_lab.report.compose import compare_report, run_report

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # results.py imports results_sections by name, as when run as a script
_spec = importlib.util.spec_from_file_location("results_script", SCRIPTS / "results.py")
assert _spec is not None and _spec.loader is not None
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)
sections = importlib.import_module("results_sections")

README_HEAD = "# a project\n\nSome pitch, with a number that must survive: 0.999.\n\n"
README_TAIL = "\n\n## Install\n\n```bash\npip install -e .\n```\n"
STALE = "| method | stale |\n| --- | --- |\n| grpo | 0.541 |"
COUPLING_ROWS = [  # (optimizer, lr, tokens_per_update, estimator, spearman, pearson)
    ("sgd", 1e-4, 1, "logit-grad", 0.95, 0.61),
    ("sgd", 1e-4, 64, "logit-grad", 0.52, 0.44),
    ("adamw", 1e-5, 1, "logit-grad", 0.89, 0.57),
    ("adamw", 1e-5, 64, "logit-grad", 0.65, 0.48),
    ("sgd", 1e-4, 1, "jvp", 0.99, 0.987),
    ("sgd", 1e-4, 64, "jvp", 0.98, 0.976),
    ("adamw", 1e-5, 1, "jvp", 0.97, 0.965),
    ("adamw", 1e-5, 64, "jvp", 0.96, 0.954),
]


def close(cell: str, value: float) -> bool:
    """A cell shown to 3 significant digits equals ``value``."""
    return float(cell) == pytest.approx(value, rel=6e-3, abs=1e-12)


def section(text: str, title: str) -> str:
    """The part of docs/results.md from the heading containing ``title`` to the next heading."""
    start = next(i for i, line in enumerate(text.splitlines()) if line.startswith("## ") and title in line)
    lines = text.splitlines()[start:]
    end = next((i for i, line in enumerate(lines[1:], 1) if line.startswith("## ")), len(lines))
    return "\n".join(lines[:end])


def readme_block(text: str) -> str:
    return text.split(results.HEADLINE_START)[1].split(results.HEADLINE_END)[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A repository root with a README and runs/compare, runs/coupling_study; results.py run once."""
    root = tmp_path_factory.mktemp("site")
    runs_dir = root / "runs"
    grpo = make_run(runs_dir / "compare" / "grpo-s0", "grpo", 0)
    steer = make_run(runs_dir / "compare" / "steer-s0", "steer", 0)
    reports = {"grpo": run_report(grpo), "steer": run_report(steer)}
    compared = compare_report({"grpo": [grpo], "steer": [steer]}, runs_dir / "compare")
    study = pd.DataFrame(
        COUPLING_ROWS, columns=["optimizer", "lr", "tokens_per_update", "estimator", "spearman", "pearson"]
    )
    (runs_dir / "coupling_study").mkdir()
    study.to_csv(runs_dir / "coupling_study" / "coupling_study.csv", index=False)
    readme = README_HEAD + results.HEADLINE_START + "\n" + STALE + "\n" + results.HEADLINE_END + README_TAIL
    (root / "README.md").write_text(readme)
    (root / "docs").mkdir()
    assert results.main(["--root", str(root), "--runs", str(runs_dir)]) == 0
    return {
        "root": root,
        "runs": runs_dir,
        "reports": reports,
        "compared": compared,
        "readme_before": readme,
        "readme": (root / "README.md").read_text(),
        "results": (root / "docs" / "results.md").read_text(),
    }


def test_report_json_holds_the_report_tables(site):
    grpo = site["runs"] / "compare" / "grpo-s0"
    data = json.loads((grpo / "report.json").read_text())
    assert (data["run"], data["scope"]) == ("grpo-s0", "run")
    assert data["config"]["method"] == "grpo" and data["config"]["lr"] == pytest.approx(1e-3)
    tables = site["reports"]["grpo"]["tables"]
    assert set(data["tables"]) == set(tables)
    softmax = next(r for r in data["tables"]["tightness"] if r["estimator"] == "softmax")
    assert softmax["gain"] == pytest.approx(GAIN, rel=1e-3)
    assert data["summary"]["trace_tokens"] == site["reports"]["grpo"]["summary"]["trace_tokens"]
    compared = json.loads((site["runs"] / "compare" / "report.json").read_text())
    assert compared["scope"] == "compare" and set(compared["config"]) == {"grpo", "steer"}
    assert [r["method"] for r in compared["tables"]["comparison"]] == list(
        site["compared"]["table"]["method"]
    )
    assert len(compared["tables"]["tightness"]) == len(site["compared"]["tightness"])
    from entropy_lab.runs import RunDir

    RunDir(grpo).check_removable()  # report.json is a file entropy-lab writes: --overwrite still works


def test_headline_and_comparison_cells_equal_the_compare_table(site):
    table = site["compared"]["table"].set_index("method")
    shown = {
        "entropy start": "initial_entropy",
        "entropy final": "final_entropy",
        "reward final": "final_reward",
        "greedy accuracy best": "best_accuracy",
        "pass@1 final": "final_pass@1",
        "pass@4 final": "final_pass@4",
    }
    block = readme_block(site["readme"])
    first = section(site["results"], "The default comparison")
    for method in ("grpo", "steer"):
        for header, column in shown.items():
            value = table.loc[method, column]
            assert close(table_column(block, method, header), value), (method, header)
            assert close(table_column(first, method, header), value), (method, header)
    assert table.loc["steer", "final_entropy"] == pytest.approx(np.linspace(1.0, 0.8, 20)[-2:].mean())


def test_tightness_and_decomposition_cells_equal_the_run_tables(site):
    tables = site["reports"]["grpo"]["tables"]
    tight = section(site["results"], "How tight")
    for row in tables["tightness"].itertuples():
        assert table_column(tight, row.estimator, "n") == str(row.n)
        for column in ("pearson", "spearman", "gain"):
            assert close(table_column(tight, row.estimator, column), getattr(row, column)), (
                row.estimator,
                column,
            )
    assert close(table_column(tight, "softmax", "gain"), GAIN)
    parts = section(site["results"], "Scale or pattern")
    for row in tables["decomposition"].itertuples():
        assert close(table_column(parts, row.part, "raw share"), row.share), row.part
        assert close(table_column(parts, row.part, "calibrated share"), row.share_calibrated), row.part
    assert close(table_column(parts, "coupling", "raw share"), 0.25)


def test_a_pivoted_study_table_equals_the_csv(site):
    text = section(site["results"], "coupling study")
    rho, jvp = text.split("Pearson r of `jvp`")[:2]
    for optimizer, lr, k, estimator, spearman, pearson in COUPLING_ROWS:
        part, expected = (rho, spearman) if estimator == "logit-grad" else (jvp, pearson)
        rows = [line for line in part.splitlines() if line.startswith(f"| {optimizer} | {lr:g} |")]
        assert len(rows) == 1, (optimizer, lr, estimator)
        header = next(line for line in part.splitlines() if line.startswith("| optimizer"))
        cells = dict(zip(header.strip("| ").split(" | "), rows[0].strip("| ").split(" | "), strict=True))
        assert close(cells[str(k)], expected)
    assert "Not generated yet" not in text
    assert "No rows" in text  # jvp-entropy is not in the study's table: said, not invented


def test_missing_runs_give_the_command_not_numbers(site):
    controllers = section(site["results"], "controllers")
    assert "Not generated yet" in controllers and "runs/controllers/report.json" in controllers
    assert sections.CONTROLLERS.command in controllers and "| method" not in controllers
    sgd = section(site["results"], "plain SGD")
    assert sgd.count("Not generated yet") == 1 and sections.SGD.command in sgd
    parts = section(site["results"], "Scale or pattern")
    assert sections.JVP.command in parts and "decomposition_jvp.png" not in parts


def test_readme_block_replaced_and_nothing_else_changes(site):
    before, after = site["readme_before"], site["readme"]
    assert after.startswith(README_HEAD + results.HEADLINE_START) and after.endswith(
        results.HEADLINE_END + README_TAIL
    )
    assert "stale" not in readme_block(after) and "| grpo |" in readme_block(after)
    assert after.replace(readme_block(after), "") == before.replace(readme_block(before), "")
    assert results.main(["--root", str(site["root"]), "--runs", str(site["runs"])]) == 0  # idempotent
    assert (site["root"] / "README.md").read_text() == after
    assert (site["root"] / "docs" / "results.md").read_text() == site["results"]


def test_figures_are_copied_from_the_runs_and_linked(site):
    gallery = site["root"] / "docs" / "gallery"
    for run, name, copied in (
        ("compare", "training_curves", "training_curves"),
        ("compare/grpo-s0", "measured_vs_predicted", "measured_vs_predicted"),
    ):
        source = site["runs"] / run / "figures" / f"{name}.png"
        assert (gallery / f"{copied}.png").read_bytes() == source.read_bytes()
        assert f"(gallery/{copied}.png)" in site["results"]
    assert "steer_weights.png" in site["results"]  # the steer run's weights vary


def test_readme_without_the_block_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "README.md").write_text(README_HEAD)
    (tmp_path / "docs").mkdir()
    with pytest.raises(SystemExit, match="exactly one"):
        results.main(["--root", str(tmp_path), "--runs", str(tmp_path / "runs")])
    assert not (tmp_path / "docs" / "results.md").exists()
    assert (tmp_path / "README.md").read_text() == README_HEAD


def test_real_model_block_gives_each_missing_run_its_command(tmp_path):
    """The optional real-model block: replaced between its markers, with the command of each missing run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    readme = README_HEAD + results.REAL_START + "\nstale 0.5\n" + results.REAL_END + README_TAIL
    block = results.real_block(runs)
    after = results.replace_block(readme, block, results.REAL_START, results.REAL_END)
    assert after.startswith(README_HEAD + results.REAL_START) and after.endswith(
        results.REAL_END + README_TAIL
    )
    assert "stale 0.5" not in after
    for table in sections.REAL_BLOCK:
        assert table.source.command in block  # the note says how to make the run
    with pytest.raises(SystemExit, match="exactly one"):
        results.replace_block(README_HEAD, block, results.REAL_START, results.REAL_END)
