"""Two-process TRL run (``accelerate launch --cpu --num_processes 2``, DDP over gloo) against one process.

Each rank traces its own shard and rank 0 writes the union with a ``rank`` column. The reference
is a single-process traced run fed the very same generation batch (the union of the ranks'
batches, saved by the 2-process run) with twice the gradient accumulation, so that the averaged
update is the same (``loss_type='dapo'`` normalises by the generation batch's token count, so the
split into micro-batches does not matter). Records are matched by (step, token sequence,
position) and must agree within fp32 tolerance, for two optimizer steps (the second off-policy).
TRL's own loss is used: per-call methods (STEER's default per-call map, Clip-Cov) depend on the split.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from trl_common import tiny_model_dir  # noqa: E402

HERE = Path(__file__).resolve().parents[2] / "helpers"

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {here!r})
    from trl_common import count_reward, dataset, grpo_args
    from entropy_lab.integrations.trl import TracedGRPOTrainer
    from trl import GRPOTrainer

    mode, model_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    fsdp2 = len(sys.argv) > 4 and sys.argv[4] == "fsdp2"

    class Recording(TracedGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            if mode == "reference":
                parts = [torch.load(f"{{out}}/../multi/gen_rank{{r}}.pt") for r in (0, 1)]
                width = max(p["completion_ids"].shape[1] for p in parts)
                def pad(x, value):
                    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
                union = {{}}
                for key in ("prompt_ids", "prompt_mask", "advantages"):
                    union[key] = torch.cat([p[key] for p in parts])
                for key, value in (("completion_ids", 0), ("completion_mask", 0), ("old_per_token_logps", 0.0)):
                    union[key] = torch.cat([pad(p[key], value) for p in parts])
                union["num_items_in_batch"] = parts[0]["num_items_in_batch"]
                return union
            result = GRPOTrainer._generate_and_score_completions(self, inputs)
            torch.save(result, f"{{out}}/gen_rank{{self.accelerator.process_index}}.pt")
            return result

        def _finish_window(self):
            w = self._window
            torch.save({{"ids": w.input_ids, "attn": w.attention_mask}},
                       f"{{out}}/window_{{mode}}_step{{w.step}}_rank{{self.accelerator.process_index}}.pt")
            super()._finish_window()

    ga = 1 if mode == "multi" else 2
    args = grpo_args(out, gradient_accumulation_steps=ga, steps_per_generation=ga, num_iterations=2,
                     max_steps=2, loss_type="dapo", learning_rate=0.1)
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, {dtype!r}))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = Recording(model=model, processing_class=tok, reward_funcs=count_reward, args=args, train_dataset=dataset(),
                        trace_every=1)
    if fsdp2:  # Accelerate enables FSDP on GPU-type devices only: set its state before train() prepares the model
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        trainer.accelerator.state.distributed_type = DistributedType.FSDP
        trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Qwen2DecoderLayer"],
            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
        trainer.is_fsdp_enabled = True
    trainer.train()
    if mode == "multi" and trainer.accelerator.is_main_process:
        from torch.distributed.tensor import DTensor
        sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
        with open(f"{{out}}/parallel.txt", "w") as f:
            f.write(f"{{type(trainer.model).__name__}} sharded={{sharded}}")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keyed(out: Path, mode: str) -> pd.DataFrame:
    import torch

    frames = []
    for f in sorted((out / "traces").glob("step_*.parquet")):
        df = pd.read_parquet(f)
        step = int(df["step"].iloc[0])
        for rank, part in df.groupby("rank"):
            w = torch.load(out / f"window_{mode}_step{step}_rank{rank}.pt")
            rows = [tuple(ids[attn.bool()].tolist()) for ids, attn in zip(w["ids"], w["attn"], strict=True)]
            part = part.assign(key=[rows[s] for s in part["sample"]])
            frames.append(part)
    return pd.concat(frames, ignore_index=True).set_index(["step", "key", "position"]).sort_index()


PRE_UPDATE = ("advantage", "ratio", "clip_indicator", "intervention_weight", "normalizer", "weight",
              "logprob", "entropy_before", "omega_paper", "omega_softmax", "omega_logit_grad",
              "omega_covariance")  # fmt: skip
POST_UPDATE = ("entropy_after", "delta_entropy", "delta_logit_linear")


def _run_both(tmp_path, dtype: str = "float32", fsdp2: bool = False):
    """Run the 2-process and the reference run; their records keyed by (step, token sequence, position).

    ``fsdp2``: the 2-process run shards the model with Accelerate's FSDP2 instead of DDP.
    """
    model_dir = tiny_model_dir(tmp_path / "model")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(here=str(HERE), dtype=dtype))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        # accelerate 1.15's --cpu launcher starts one process (several only through mpirun); --multi_gpu
        # starts them through torchrun, and use_cpu=True in GRPOConfig makes Accelerate use gloo on CPU.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    multi, ref = tmp_path / "multi", tmp_path / "reference"
    multi.mkdir()
    ref.mkdir()
    for cmd, out in (
        (launch + [str(script), "multi"], multi),
        ([sys.executable, str(script), "reference"], ref),
    ):
        proc = subprocess.run(
            cmd + [str(model_dir), str(out)] + (["fsdp2"] if fsdp2 and out is multi else []),
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _keyed(multi, "multi"), _keyed(ref, "reference")
    assert set(a["rank"]) == {0, 1} and set(b["rank"]) == {0}
    assert len(a) == len(b) and a.index.equals(b.index)
    return a, b


def _max_diff(a, b, columns):
    return {c: float(np.abs(a[c].to_numpy() - b[c].to_numpy()).max()) for c in columns}


def test_two_process_trace_equals_one_process(tmp_path):
    """About 100 s on a shared 2-core CPU (two launches); fp32 (bf16=False), SGD."""
    a, b = _run_both(tmp_path)
    assert (tmp_path / "multi" / "parallel.txt").read_text() == "Qwen2ForCausalLM sharded=False"
    diffs = _max_diff(a, b, PRE_UPDATE + POST_UPDATE)
    print("max |2-process - 1-process| over both steps:", diffs)
    for col, diff in diffs.items():
        assert diff <= 1e-5 + 1e-4 * float(np.abs(b[col]).max()), (col, diff)
    assert float(np.abs(b["delta_entropy"]).max()) > 1e-3  # the updates moved the entropies
    assert float(np.abs(b.loc[2]["ratio"] - 1).max()) > 1e-3  # the second update is off-policy


@pytest.mark.slow  # about 60-80 s on a shared 2-core CPU (two launches)
def test_two_process_fsdp2_trace_equals_one_process(tmp_path):
    """The same under Accelerate's FSDP2 (fully_shard per decoder layer and at the root, gloo on CPU).

    Accelerate 1.16 turns FSDP on for GPU-type devices only (``accelerate launch --use_fsdp`` on CPU
    silently runs DDP), so the child sets Accelerate's state to FSDP2 after building the trainer;
    ``accelerator.prepare`` then shards the model as it would on GPUs.
    """
    a, b = _run_both(tmp_path, fsdp2=True)
    assert (tmp_path / "multi" / "parallel.txt").read_text() == "FSDPQwen2ForCausalLM sharded=True"
    diffs = _max_diff(a, b, PRE_UPDATE + POST_UPDATE)
    print("FSDP2: max |2-process - 1-process| over both steps:", diffs)
    for col, diff in diffs.items():
        assert diff <= 1e-5 + 1e-4 * float(np.abs(b[col]).max()), (col, diff)
    assert float(np.abs(b["delta_entropy"]).max()) > 1e-3
