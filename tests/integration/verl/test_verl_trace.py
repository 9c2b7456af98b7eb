"""A verl actor update (TrainingWorker, FSDP2 engine over gloo, on the CPU) traced into a run directory.

The update runs in a subprocess (it initialises torch.distributed); see tests/verl_actor_cpu_run.py.
The records must line up with verl's own numbers for the same tokens: the tracer's pre-update
log-prob equals verl's old log-prob (computed by verl's infer_batch), its entropy equals verl's entropy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("verl")

from entropy_lab.records import COLUMNS  # noqa: E402
from entropy_lab.runs import RunDir  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "helpers" / "verl_actor_cpu_run.py"


def _trl_blocks_verl_engine() -> bool:
    """verl 0.9.1's FSDP engine imports TRL's value-head model whenever TRL is installed; TRL 1.x has none."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return False
    try:
        from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
    except ImportError:
        try:
            from trl import AutoModelForCausalLMWithValueHead  # noqa: F401
        except ImportError:
            return True
    return False


@pytest.mark.slow
def test_traced_verl_actor_update_on_cpu(tmp_path):
    if _trl_blocks_verl_engine():
        pytest.skip(
            "verl 0.9.1's FSDP engine fails with this TRL installed (no AutoModelForCausalLMWithValueHead)"
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29563"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "run"), "entropy_lab.steer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["moved"] > 1e-4  # verl's optimizer stepped
    assert report["n_records"] == report["n_tokens"] == 26
    assert report["logprob_spread"] > 1.0  # a peaked model: misaligned tokens would not match
    assert report["logprob_vs_verl"] < 1e-4
    assert report["entropy_vs_verl"] < 1e-4
    assert report["advantage_vs_verl"] == 0.0
    assert report["delta_entropy_abs_mean"] > 1e-4

    run = RunDir(tmp_path / "run")
    record = run.read_config()
    assert record["engine"] == "verl" and record["config"]["method"] == "entropy_lab.steer"
    (trace,) = run.trace_files()
    df = pd.read_parquet(trace)
    assert list(df.columns) == [*COLUMNS, "omega_paper_appendix"]  # contract, then registered extras
    metrics = run.read_metrics()
    assert metrics["traced"].tolist() == [True]
    assert {"loss", "grad_norm", "entropy/before"} <= set(metrics.columns)
