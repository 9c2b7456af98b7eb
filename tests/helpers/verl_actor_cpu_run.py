"""Run verl's actor update (TrainingWorker + FSDP2 engine over gloo) on the CPU, traced.

Used by tests/integration/verl/test_verl_trace.py in a subprocess (it initialises torch.distributed):
    python tests/helpers/verl_actor_cpu_run.py RUN_DIR LOSS_MODE
Prints one JSON line with what the test checks.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29561")
for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
    os.environ[k] = v

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import verl  # noqa: E402, F401

from entropy_lab.integrations.verl.cpu import use_cpu_platform  # noqa: E402

use_cpu_platform()

from tensordict import TensorDict  # noqa: E402
from tiny_lm import make_tiny_lm  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import (  # noqa: E402
    ActorConfig,
    FSDPEngineConfig,
    FSDPOptimizerConfig,
    HFModelConfig,
    PolicyLossConfig,  # noqa: E402
)
from verl.workers.config.engine import TrainingWorkerConfig  # noqa: E402
from verl.workers.engine_workers import TrainingWorker  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from entropy_lab.integrations.verl import actor_loss  # noqa: E402
from entropy_lab.integrations.verl.trace import VerlTraceRun  # noqa: E402

V, P, R, B = 48, 4, 6, 6


def tiny_model(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    make_tiny_lm(vocab_size=V, max_position_embeddings=64, initializer_range=0.5).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1").save_pretrained(path)


def actor_batch() -> TensorDict:
    """Left-padded prompts and right-padded responses, as verl's trainer holds them."""
    g = torch.Generator().manual_seed(1)
    prompt_lens = torch.tensor([4, 2, 3, 4, 1, 3])
    resp_lens = torch.tensor([6, 3, 5, 2, 6, 4])
    prompts = torch.randint(2, V, (B, P), generator=g)
    responses = torch.randint(2, V, (B, R), generator=g)
    pmask = (torch.arange(P)[None] >= (P - prompt_lens)[:, None]).long()
    rmask = (torch.arange(R)[None] < resp_lens[:, None]).long()
    prompts, responses = prompts * pmask, responses * rmask
    attention = torch.cat([pmask, rmask], 1)
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5])[:, None] * rmask
    td = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention,
            "position_ids": position,
            "response_mask": rmask,
            "advantages": adv.float(),
        },
        batch_size=[B],
    )
    return td


def main(run_dir: str, loss_mode: str) -> None:
    dist.init_process_group("gloo")
    model_dir = tempfile.mkdtemp()
    tiny_model(model_dir)
    mc = HFModelConfig(
        path=model_dir,
        use_remove_padding=False,
        enable_gradient_checkpointing=False,
        override_config={"attn_implementation": "eager"},
    )
    worker = TrainingWorker(
        TrainingWorkerConfig(
            model_type="language_model",
            model_config=mc,
            engine_config=FSDPEngineConfig(
                strategy="fsdp2",
                micro_batch_size_per_gpu=3,
                infer_micro_batch_size_per_gpu=3,
                use_dynamic_bsz=False,
                mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
            ),
            optimizer_config=FSDPOptimizerConfig(lr=1e-2, clip_grad=1e6),
            checkpoint_config=CheckpointConfig(),
        )
    )
    worker.reset()
    config = ActorConfig(
        strategy="fsdp2",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=3,
        calculate_entropy=True,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )
    worker.set_loss_fn(functools.partial(actor_loss, config=config))

    # old log-probs from verl's own forward (the trainer's compute_log_prob)
    td = left_right_2_no_padding(actor_batch())
    tu.assign_non_tensor(
        td, temperature=1.0, calculate_entropy=True, compute_loss=False, global_token_num=None
    )
    out = worker.infer_batch(td.copy())
    old = no_padding_2_padding(tu.get(out, "log_probs"), td).float()  # (B, R)
    verl_entropy = no_padding_2_padding(tu.get(out, "entropy"), td).float()  # (B, R)
    td["old_log_probs"] = old
    tu.assign_non_tensor(td, compute_loss=True, global_batch_size=B, update_lr_scheduler=False)

    run = VerlTraceRun(
        run_dir, verl_config={"actor": {"loss_mode": loss_mode}}, method=loss_mode, overwrite=True
    )
    before = [p.detach().clone() for p in worker.engine.module.parameters()]
    run.train_batch(worker, td, step=0)
    moved = max(
        float((p.detach() - b).abs().max())
        for p, b in zip(worker.engine.module.parameters(), before, strict=True)
    )
    import pandas as pd

    rec = pd.read_parquet(os.path.join(run_dir, "traces", "step_000000.parquet"))
    prompt_lens = td["attention_mask"][:, :P].sum(-1)
    r = torch.as_tensor(rec["position"].to_numpy()) - prompt_lens[torch.as_tensor(rec["sample"].to_numpy())]
    b = torch.as_tensor(rec["sample"].to_numpy())
    report = {
        "moved": moved,
        "n_tokens": int(td["response_mask"].sum()),
        "n_records": len(rec),
        "logprob_vs_verl": float(
            (torch.as_tensor(rec["logprob"].to_numpy()) - old[b, r].double()).abs().max()
        ),
        "entropy_vs_verl": float(
            (torch.as_tensor(rec["entropy_before"].to_numpy()) - verl_entropy[b, r].double()).abs().max()
        ),
        "advantage_vs_verl": float(
            (torch.as_tensor(rec["advantage"].to_numpy()) - td["advantages"][b, r].double()).abs().max()
        ),
        "logprob_spread": float(rec["logprob"].std()),
        "delta_entropy_abs_mean": float(rec["delta_entropy"].abs().mean()),
        "pearson_logit_grad": float(rec["delta_entropy"].corr(rec["omega_logit_grad"])),
    }
    print(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
