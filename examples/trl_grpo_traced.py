"""A traced TRL GRPO run with STEER on a tiny model, then ``entropy-lab trace --run`` on its output.

    pip install -e ".[trl]"
    python examples/trl_grpo_traced.py [RUN_DIR]        # default runs/trl-steer

A tiny Qwen2-shaped causal LM is built from a config (random init, nothing downloaded), with a
character tokenizer from the ``tokenizers`` library, both saved with ``save_pretrained`` and
loaded by TRL from that directory. TRL's ``GRPOTrainer`` (here ``TracedGRPOTrainer``) trains it
with STEER for 16 optimizer steps (gradient accumulation 2, num_iterations 2), tracing every
fourth step. The run directory then holds config.json, metrics.parquet and traces/, and the
project's CLI analyses it like a bundled run. Training takes seconds; imports and the
report's figures most of a minute on a shared 2-core CPU.
"""

import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from trl import GRPOConfig
from typer.testing import CliRunner

from entropy_lab.cli.app import app
from entropy_lab.integrations.trl import TracedGRPOTrainer
from entropy_lab.tokenizer import build_char_tokenizer

RUN = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/trl-steer")
t0 = time.perf_counter()

# --- a tiny policy and tokenizer, saved like any Hugging Face model -----------------------------
tok = build_char_tokenizer("0123456789+=")
cfg = transformers.Qwen2Config(
    vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    initializer_range=0.1,
)  # fmt: skip
torch.manual_seed(0)
model_dir = RUN.parent / f"{RUN.name}-model"
transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
tok.save_pretrained(model_dir)

# --- a toy verifiable task: answer a+b with its last digit --------------------------------------
rows = [(a, b) for a in range(10) for b in range(10)]
data = Dataset.from_dict(
    {"prompt": [f"{a}+{b}=" for a, b in rows], "answer": [str((a + b) % 10) for a, b in rows]}
)


def correct(completions, answer, **kwargs):
    return [float(c[:1] == a) for c, a in zip(completions, answer, strict=True)]


# --- TRL, traced, with STEER computed by entropy-lab ---------------------------------------------
if RUN.is_dir() and any(RUN.iterdir()) and not (RUN / ".entropy-lab-run").is_file():
    sys.exit(f"error: {RUN} is not empty and holds no entropy-lab run; give another directory")
shutil.rmtree(RUN, ignore_errors=True)  # an earlier run of this example (it carries the marker)
args = GRPOConfig(
    output_dir=str(RUN), per_device_train_batch_size=8, num_generations=8, max_completion_length=4,
    gradient_accumulation_steps=2, num_iterations=2, max_steps=16, learning_rate=1e-3, temperature=1.0,
    loss_type="dapo", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    disable_tqdm=True, bf16=False,  # fp32 training (the records are fp32 under bf16 too)
)  # fmt: skip
trainer = TracedGRPOTrainer(
    model=str(model_dir), reward_funcs=correct, args=args, train_dataset=data, processing_class=tok,
    method="steer", trace_every=4,
)  # fmt: skip
trainer.train()
print(f"trained and traced in {time.perf_counter() - t0:.1f} s: {RUN}")

# --- the project's analysis of the TRL run -----------------------------------------------------
result = CliRunner().invoke(app, ["trace", "--run", str(RUN)])
print(result.output)
sys.exit(result.exit_code)
