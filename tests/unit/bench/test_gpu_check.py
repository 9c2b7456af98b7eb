"""``bash benchmarks/gpu/run.sh --dry-run``: every part of the GPU check runs on the CPU at tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert list(parts) == ["env", "trace_smollm2", "trace_qwen2_0p5b", "token_stats", "jvp", "trl"]
    for name, res in parts.items():
        assert res["status"] in ("ok", "skipped"), (name, res.get("traceback"))
    for name in ("trace_smollm2", "trace_qwen2_0p5b"):
        res = parts[name]
        assert res["logits_path"].startswith("hidden states")
        # fp32 on the CPU: the records equal the recomputation from full logits.
        for key in ("entropy_before", "entropy_after"):
            assert res["error_vs_fp32"][key]["max_abs"] <= 1e-5, (name, key)
        assert res["traced"]["seconds"] > 0 and res["untraced"]["seconds"] > 0
    assert max(parts["token_stats"]["max_abs_diff"].values()) <= 1e-3
    assert parts["jvp"]["ratio_jvp_over_forward"] > 0


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    code = (
        "import sys; sys.path.insert(0, 'benchmarks/gpu'); import check\n"
        "check.PARTS['env'] = lambda args: 1 / 0\n"
        f"sys.exit(check.main(['--dry-run', '--out', {str(tmp_path)!r}, '--parts', 'env,token_stats']))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["env"]["status"] == "error" and "ZeroDivisionError" in parts["env"]["error"]
    assert parts["token_stats"]["status"] == "ok"
