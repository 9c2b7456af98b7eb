"""examples/trl_grpo_traced.py runs end to end and its run directory passes ``entropy-lab trace --run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 70 s on a shared 2-core CPU
def test_trl_example_runs_and_is_traced(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "trl_grpo_traced.py"), str(run)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tightness" in proc.stdout
    assert sorted(p.name for p in (run / "traces").iterdir()) == [
        f"step_{s:06d}.parquet" for s in (4, 8, 12, 16)
    ]
    assert (run / "metrics.parquet").is_file() and (run / "report.md").is_file()
