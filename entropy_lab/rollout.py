"""Rollouts: KV-cached sampling of n responses per prompt, and evaluation (greedy accuracy, pass@k).

A rollout batch lays each sequence out as [left padding | prompt | response | right
padding] with explicit ``position_ids`` (counted over real tokens), so the training
forward sees exactly the positions generation used. The response includes its EOS token,
which carries gradient like any other token.

Simplifications: sampling uses ``model.generate`` (KV cache, temperature, top-p, no
top-k) and the global torch RNG, so a run is reproducible from its saved RNG states;
the policy optimised is the untempered softmax of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any

import numpy as np
import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import token_stats
from entropy_lab.tasks import Problem, Task


@dataclass
class Rollout:
    """One batch of sampled sequences; row r answers problem ``prompt_index[r]``."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) 1 at response tokens (EOS included)
    prompt_index: torch.Tensor  # (B,)
    completions: list[str]

    @property
    def response_lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(-1)

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs of rows ``idx``."""
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "position_ids": self.position_ids[idx],
        }


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The token ids a prompt is fed as: BOS prepended when the tokenizer has one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def model_positions(model) -> int | None:
    """The positions the model was built for (``max_position_embeddings``, GPT-2's ``n_positions``); None if unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """One error line unless a prompt of ``prompt_tokens`` and its response fit the model's positions."""
    limit = model_positions(model)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    fix = (
        f"lower max_new_tokens to at most {limit - prompt_tokens}"
        if prompt_tokens < limit
        else "use shorter prompts or a model with more positions"
    )
    raise EntropyLabError(
        f"a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} needs "
        f"{prompt_tokens + max_new_tokens} positions, but the model has {limit} (max_position_embeddings); {fix}"
    )


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, (P, Tp); BOS prepended when the tokenizer has one."""
    rows = [prompt_ids(tokenizer, text) for text in prompts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        attn[i, T - len(r) :] = 1
    return ids.to(device), attn.to(device)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens: (B, T) -> (B, T), 0 at padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    problems: list[Problem],
    n: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 16,
    greedy: bool = False,
) -> Rollout:
    """n responses to each problem (rows grouped by problem: problem i owns rows i*n .. i*n+n-1)."""
    device = next(model.parameters()).device
    p_ids, p_attn = encode_prompts(tokenizer, [p.prompt for p in problems], device)
    check_positions(model, p_ids.shape[1], max_new_tokens)
    p_ids, p_attn = p_ids.repeat_interleave(n, 0), p_attn.repeat_interleave(n, 0)
    gen_kw: dict[str, Any] = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    )
    out = model.generate(
        input_ids=p_ids,
        attention_mask=p_attn,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **gen_kw,
    )
    resp = out[:, p_ids.shape[1] :]  # (B, L)
    is_eos = resp == tokenizer.eos_token_id
    # keep tokens up to and including the first EOS
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    resp_mask = (~after_eos).long()
    completions = []
    for row, m, e in zip(resp.tolist(), resp_mask.tolist(), is_eos.tolist(), strict=True):
        toks = [t for t, keep, eos in zip(row, m, e, strict=True) if keep and not eos]
        completions.append(tokenizer.decode(toks, skip_special_tokens=True))
    attention_mask = torch.cat([p_attn, resp_mask], 1)
    input_ids = torch.where(attention_mask.bool(), out, torch.full_like(out, tokenizer.pad_token_id))
    response_mask = torch.cat([torch.zeros_like(p_attn), resp_mask], 1)
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        response_mask=response_mask,
        prompt_index=torch.arange(len(problems), device=device).repeat_interleave(n),
        completions=completions,
    )


@torch.no_grad()
def response_stats(model, rollout: Rollout, micro_batch_size: int = 0) -> dict[str, torch.Tensor]:
    """Per-token log pi(token), entropy and collision at every position of the rollout, (B, T) each.

    Values sit at the position of the predicted token (aligned with ``input_ids``);
    position 0 holds zeros.
    """
    B, T = rollout.input_ids.shape
    out = {k: torch.zeros(B, T, device=rollout.input_ids.device) for k in ("logprob", "entropy", "collision")}
    mb = micro_batch_size or B
    for s in range(0, B, mb):
        idx = torch.arange(s, min(B, s + mb), device=rollout.input_ids.device)
        logits = model(**rollout.rows(idx)).logits  # (b, T, V)
        st = token_stats(logits[:, :-1], rollout.input_ids[idx, 1:], check_finite=False)  # the trainer checks
        assert st.logprob is not None  # targets were given
        out["logprob"][idx, 1:] = st.logprob.float()
        out["entropy"][idx, 1:] = st.entropy.float()
        out["collision"][idx, 1:] = st.collision.float()
    return out


def mean_response_entropy(stats: dict[str, torch.Tensor], rollout: Rollout) -> float:
    """Mean entropy over response tokens (nats, token-level)."""
    m = rollout.response_mask.float()
    return float((stats["entropy"] * m).sum() / m.sum().clamp(min=1))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def rewards_of(task: Task, problems: list[Problem], rollout: Rollout) -> torch.Tensor:
    """(B,) reward of each row."""
    idx = rollout.prompt_index.tolist()
    return torch.tensor([task.reward(problems[i], c) for i, c in zip(idx, rollout.completions, strict=True)])


@torch.no_grad()
def evaluate_sampled(
    model,
    tokenizer,
    task: Task,
    problems: list[Problem],
    *,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Sampled pass@1 and mean response-token entropy of one sample per problem (RNG states restored)."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # CPU and every GPU
        torch.manual_seed(seed)
        ro = sample(
            model,
            tokenizer,
            problems,
            1,
            temperature=temperature,
            max_new_tokens=max_new_tokens or task.max_new_tokens,
        )
    rewards = rewards_of(task, problems, ro)
    ent = mean_response_entropy(response_stats(model, ro), ro)
    return {"pass@1": float(rewards.mean()), "entropy": ent}


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task: Task,
    problems: list[Problem],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> dict[str, float]:
    """Greedy accuracy and unbiased pass@1..k from k samples per problem; the global RNG states are restored."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # CPU and every GPU
        torch.manual_seed(seed)
        greedy = sample(model, tokenizer, problems, 1, max_new_tokens=max_new_tokens, greedy=True)
        sampled = sample(
            model, tokenizer, problems, k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
    out = {"eval/accuracy": float(rewards_of(task, problems, greedy).mean())}
    correct = (rewards_of(task, problems, sampled) > 0).view(len(problems), k).sum(-1).tolist()
    for j in range(1, k + 1):
        out[f"eval/pass@{j}"] = float(np.mean([pass_at_k(k, c, j) for c in correct]))
    return out
