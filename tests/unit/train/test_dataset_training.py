"""`--model DIR --dataset FILE`: a local chat model trains on real verl-format rows."""

import dataclasses
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from entropy_lab.methods import resolve_config
from entropy_lab.models import build_tiny_policy, load_policy
from entropy_lab.tokenizer import build_char_tokenizer
from entropy_lab.trainer import Trainer

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.mark.skipif(not (DATA / "DAPO-Math-17k.parquet").is_file(), reason="shared data not present")
@pytest.mark.filterwarnings("ignore:the optimizer step left every traced logit unchanged")
def test_chat_model_trains_on_dapo_rows(tmp_path, tiny_spec):
    tok = build_char_tokenizer(string.printable)
    tok.chat_template = TEMPLATE
    model_dir = tmp_path / "chat"
    # chat-templated prompts of character tokens run to ~1200 positions (rotary: no weights depend on it)
    build_tiny_policy(tok, dataclasses.replace(tiny_spec, max_position_embeddings=2048)).save_pretrained(
        model_dir
    )
    tok.save_pretrained(model_dir)
    assert load_policy(model_dir)[1].chat_template == TEMPLATE  # the template survives the round trip
    cfg = resolve_config(
        "grpo",
        dict(
            model=str(model_dir),
            dataset=str(DATA / "DAPO-Math-17k.parquet"),
            steps=1,
            prompts_per_step=2,
            samples_per_prompt=2,
            max_new_tokens=3,
            eval_prompts=2,
            eval_k=1,
            trace_every=1,
            device="cpu",
        ),
    )
    trainer = Trainer(cfg, tmp_path / "run")
    metrics = trainer.train()
    assert trainer.task.sample(1, np.random.default_rng(0))[0].prompt.startswith("<|user|>")
    assert len(metrics) == 1 and metrics["reward/mean"].between(0, 1).all()
    assert len(pd.read_parquet(tmp_path / "run" / "eval.parquet")) == 2  # step 0 and the last step
