"""The examples run as documented and print what the README promises."""

import math
import subprocess
import sys
from pathlib import Path

from entropy_lab.records import COLUMNS, load_records

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ESTIMATOR_NAMES = ("paper", "sampled-logit", "softmax", "logit-grad", "covariance")


def test_trace_your_loop_prints_tightness_and_saves_records(tmp_path):
    out = tmp_path / "runs" / "trace_your_loop" / "step_000000.parquet"  # the default, under runs/
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "trace_your_loop.py")],
        cwd=tmp_path,  # nothing is written next to the sources
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["estimator"])
    assert lines[header].split() == ["estimator", "pearson", "spearman", "gain", "sign", "agree"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1 :] if line.strip()}
    for name in ESTIMATOR_NAMES:
        assert name in rows, f"{name} missing from the table:\n{proc.stdout}"
        values = [float(v) for v in rows[name]]
        assert len(values) == 4 and all(math.isfinite(v) for v in values), (name, rows[name])
        assert -1 <= values[0] <= 1 and -1 <= values[1] <= 1 and 0 <= values[3] <= 1
    df, config = load_records(out)
    assert list(df.columns) == [*COLUMNS, "omega_paper_appendix"] and len(df) > 0
    assert config["example"] == "trace_your_loop"
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # and nothing elsewhere
