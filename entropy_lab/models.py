"""Policies: the embedded tiny default, its supervised warm start, and local Hugging Face models.

The default policy is a small Qwen2-family causal LM built from a config (random init)
over the task's character tokenizer, warm-started by supervised training on the task's
demonstrations (uniformly drawn correct answers, so the warm start is diverse) until its
sampled pass@1 first reaches ``target_pass`` (or ``max_steps``). RL then has something to
sharpen. A warm start is keyed by everything that determines it (``warm_start_recipe``) and
found, in this order, in the user cache (a rebuilt one), among the package's shipped assets
(``entropy_lab.warm_starts``), or trained then and cached; training checkpoints itself under the
cache and resumes after a kill.

Simplifications: the warm start is stopped by a pass@1 threshold measured on a fixed
probe set of training problems, not tuned per method; dropout is off in every policy
(as is usual for RL on LMs), so every forward is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from entropy_lab import warm_starts
from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.stats import gather_logprobs
from entropy_lab.tasks import Task, build_task, get_task, load_dataset_task
from entropy_lab.tokenizer import build_char_tokenizer
from entropy_lab.untrusted import check_safetensors, read_json


@dataclass(frozen=True)
class TinyPolicySpec:
    """Architecture of the embedded default policy (Qwen2 family)."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class WarmStartSpec:
    """Supervised warm start: AdamW on demonstrations until sampled pass@1 >= target_pass."""

    batch_size: int = 128
    lr: float = 3e-3
    max_steps: int = 1500
    check_every: int = 50
    target_pass: float = 0.3
    probe_prompts: int = 256
    seed: int = 0


def cache_root() -> Path:
    """$ENTROPY_LAB_CACHE, else $XDG_CACHE_HOME/entropy-lab, else ~/.cache/entropy-lab."""
    env = os.environ.get("ENTROPY_LAB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "entropy-lab"


def build_tiny_policy(tokenizer, spec: TinyPolicySpec = TinyPolicySpec(), seed: int = 0):
    """A random-init Qwen2 causal LM over ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        **asdict(spec),
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def load_policy(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model, tokenizer) from any ``--model`` form; one error line if unusable.

    Args:
        path: a local directory saved with ``save_pretrained``, a hub id ``org/name``, a ``.gguf``
            file or a registered name (``entropy_lab.model_sources.resolve_model``).
        device: where the model goes.
    """
    from entropy_lab.model_sources import resolve_model  # it reads cache_root from this module

    where = resolve_model(path)  # a local directory, or a hub id whose config.json is cached
    if Path(where).is_dir():
        check_model_files(Path(where))
    try:
        tokenizer = (
            load_tokenizer(Path(where)) if Path(where).is_dir() else AutoTokenizer.from_pretrained(where)
        )
        model = AutoModelForCausalLM.from_pretrained(where)
    except EntropyLabError:
        raise
    except Exception as exc:  # transformers, tokenizers and safetensors raise many types for a damaged folder
        why = (str(exc).splitlines() or [""])[0][:160] or type(exc).__name__
        raise EntropyLabError(f"could not load the model in {where}: {why}") from None
    check_tokenizer_matches(model, tokenizer, where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_tokenizer(path: Path):
    """The tokenizer saved in ``path``.

    A generic tokenizers-library tokenizer (our character tokenizer) is loaded as such:
    ``AutoTokenizer`` would pick the class of the model type found in the same directory
    (e.g. Qwen2's, whose own pre-tokenizer drops spaces) instead of the saved one.
    """
    cfg_file = path / "tokenizer_config.json"
    cls = read_json(cfg_file, what="tokenizer file").get("tokenizer_class") if cfg_file.is_file() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


MODEL_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""The small JSON files of a model folder, read before transformers parses them (size, depth, an object)."""


def check_model_files(path: Path) -> None:
    """A local model folder's JSON files and safetensors headers are sane (``entropy_lab.untrusted``).

    Weights are only ever read by safetensors or, for ``.bin`` files, by transformers'
    ``torch.load(weights_only=True)``: no file of a model folder can run code.
    """
    for name in MODEL_JSON_FILES:
        if (path / name).exists():
            read_json(path / name, what="model file")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)


def check_tokenizer_matches(model, tokenizer, where: str) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise EntropyLabError(
            f"the tokenizer in {where} has {len(tokenizer)} tokens but its model has {n_emb} embeddings: "
            "they do not belong together"
        )


def _demo_batch(task: Task, tokenizer, n: int, rng: np.random.Generator):
    """Tokenised prompt+demonstration+EOS sequences: ids (n, T), attention and loss masks (n, T)."""
    problems = task.sample(n, rng)
    rows, masks = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(task.demonstration(p, rng), add_special_tokens=False)["input_ids"]
        rows.append([tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id])
        masks.append([0] * (1 + len(prompt)) + [1] * (len(answer) + 1))
    T = max(map(len, rows))
    ids = torch.full((n, T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros(n, T, dtype=torch.long)
    loss_mask = torch.zeros(n, T)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss_mask


DEFAULT_WARM_START_TASKS = ("countdown", "arithmetic")
"""The tasks whose default warm starts ship in the package."""


def warm_start_recipe(
    task: Task, spec: WarmStartSpec = WarmStartSpec(), arch: TinyPolicySpec = TinyPolicySpec()
) -> dict:
    """Everything that determines a warm start: the task's generator, the SFT recipe, the architecture."""
    return {
        "task": task.name,
        # the generator's settings (number ranges, operators ...): a changed task retrains
        "task_settings": {k: v for k, v in vars(task).items() if isinstance(v, (int, float, str, bool))},
        "alphabet": task.alphabet(),
        "spec": asdict(spec),
        "arch": asdict(arch),
        "transformers": transformers.__version__.split(".")[0],
        "v": 1,
    }


def warm_start_name(recipe: dict) -> str:
    """``task-key``: the name of a warm start in the cache and among the shipped assets."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return f"{recipe['task']}-{key}"


class WarmStartLocation(NamedTuple):
    """Where ``warm_start`` finds a warm start: ``source`` is "cache", "shipped" or "build"."""

    name: str  # task-key
    source: str
    path: Path  # the cache entry, or the shipped record (NAME.json); for "build", the entry to write


def locate_warm_start(
    task: Task,
    spec: WarmStartSpec = WarmStartSpec(),
    arch: TinyPolicySpec = TinyPolicySpec(),
    asset_dir: Path = warm_starts.ASSET_DIR,
) -> WarmStartLocation:
    """The user cache (a rebuilt warm start) first, then the shipped asset, else a build."""
    name = warm_start_name(warm_start_recipe(task, spec, arch))
    entry = cache_root() / "warmstart" / name
    if (entry / "info.json").is_file():
        return WarmStartLocation(name, "cache", entry)
    record = warm_starts.shipped_record(name, asset_dir)
    if record is not None:
        return WarmStartLocation(name, "shipped", record)
    return WarmStartLocation(name, "build", entry)


def warm_start(
    task: Task,
    spec: WarmStartSpec = WarmStartSpec(),
    arch: TinyPolicySpec = TinyPolicySpec(),
    progress=None,
    use_cache: bool = True,
    checkpoint_every: int = 50,
    asset_dir: Path = warm_starts.ASSET_DIR,
):
    """(model, tokenizer, info) of the supervised warm start for a built-in ``task``.

    Found as ``locate_warm_start`` says; ``use_cache=False`` trains it again (a rebuild) and
    replaces the cache entry. Training saves a checkpoint every ``checkpoint_every`` SFT steps
    (0: never) and resumes from it. ``info`` holds the measured sampled pass@1 and mean
    response-token entropy at the end, the number of SFT steps, the weights' SHA-256 and where
    they are (``cache_dir`` or ``asset``). ``progress`` is called after every SFT step with
    {"step", "total", "loss", "pass@1", "target"} (``load_policy_and_task``).
    """
    tokenizer = build_char_tokenizer(task.alphabet())
    found = locate_warm_start(task, spec=spec, arch=arch, asset_dir=asset_dir)
    where = cache_root() / "warmstart" / found.name
    if use_cache and found.source == "cache":
        model, tok = load_policy(where)
        # where it is now (an entry may have been copied from another cache)
        return model, tok, {**json.loads((where / "info.json").read_text()), "cache_dir": str(where)}
    if use_cache and found.source == "shipped":
        weights, record = warm_starts.read_asset(found.path)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # its random init is replaced
            model = build_tiny_policy(tokenizer, arch, seed=spec.seed)
        warm_starts.load_weights(model, weights, found.path)
        info = {k: record[k] for k in ("steps", "sft_loss", "pass@1", "entropy", "sha256")}
        return model.eval(), tokenizer, {**info, "asset": str(found.path)}

    checkpoint = warm_starts.SFTCheckpoint(where.with_name(found.name + ".resume.pt"), checkpoint_every)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # leave the caller's RNG alone
        model, info = _supervised_warm_start(task, tokenizer, spec, arch, progress, checkpoint)
    info["cache_dir"] = str(where)
    tmp = where.with_name(where.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info["sha256"] = warm_starts.sha256_file(tmp / warm_starts.WEIGHTS_FILE)
    info["built_with"] = warm_starts.build_platform()
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(where, ignore_errors=True)
    tmp.rename(where)
    checkpoint.remove()
    # Hand back the saved copy, loaded, so a fresh and a cached warm start are the same object.
    model, tokenizer = load_policy(where)
    return model, tokenizer, info


def export_warm_start(
    task: Task,
    out_dir: Path,
    spec: WarmStartSpec = WarmStartSpec(),
    arch: TinyPolicySpec = TinyPolicySpec(),
) -> Path:
    """Write the cached warm start of ``task`` as a shipped asset into ``out_dir``; returns its record.

    The record holds the recipe, the seed, the steps and pass@1 reached (on ``probe_prompts``
    training problems drawn with seed ``seed + 1``, one sample each at temperature 1), the
    weights' SHA-256 and the platform that built them.
    """
    recipe = warm_start_recipe(task, spec, arch)
    name = warm_start_name(recipe)
    entry = cache_root() / "warmstart" / name
    if not (entry / "info.json").is_file():
        raise EntropyLabError(
            f"there is no cached warm start {name} to export; build it first: "
            f"entropy-lab warm-start --task {task.name} --rebuild"
        )
    info = json.loads((entry / "info.json").read_text())
    sha = warm_starts.sha256_file(entry / warm_starts.WEIGHTS_FILE)
    if info.get("sha256", sha) != sha:
        raise EntropyLabError(f"the cached warm start {entry} changed after it was written; rebuild it")
    record = {
        "task": task.name,
        "name": name,
        "recipe": recipe,
        "seed": spec.seed,
        **{k: info[k] for k in ("steps", "sft_loss", "pass@1", "entropy")},
        "pass@1_measured_on": {
            "problems": spec.probe_prompts,
            "problem_seed": spec.seed + 1,
            "sampling_seed": spec.seed,
            "temperature": 1.0,
        },
        "sha256": sha,
        "built_with": info.get("built_with", {}),
    }
    return warm_starts.write_asset(entry, name, record, out_dir)


def _supervised_warm_start(
    task: Task,
    tokenizer,
    spec: WarmStartSpec,
    arch: TinyPolicySpec,
    progress,
    checkpoint: warm_starts.SFTCheckpoint | None = None,
):
    """Train the tiny policy on demonstrations until sampled pass@1 >= spec.target_pass: (model, info)."""
    from entropy_lab.rollout import evaluate_sampled  # the rollout module imports this one

    model = build_tiny_policy(tokenizer, arch, seed=spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    rng = np.random.default_rng(spec.seed)
    probe = task.sample(spec.probe_prompts, np.random.default_rng(spec.seed + 1))
    info: dict = {"steps": 0}
    first = 1
    state = checkpoint.load() if checkpoint is not None else None
    if checkpoint is not None and state is not None:
        first, info = checkpoint.restore(state, model, opt, rng), state["info"]
    for step in range(first, spec.max_steps + 1):
        ids, attn, loss_mask = _demo_batch(task, tokenizer, spec.batch_size, rng)
        logits = model(input_ids=ids, attention_mask=attn).logits  # (n, T, V)
        lp = gather_logprobs(logits[:, :-1], ids[:, 1:])  # (n, T-1)
        loss = -(lp * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        measured = None
        if step % spec.check_every == 0 or step == spec.max_steps:
            stats = evaluate_sampled(model, tokenizer, task, probe, temperature=1.0, seed=spec.seed)
            info = {"steps": step, "sft_loss": float(loss.detach()), **stats}
            measured = stats["pass@1"]
        if progress is not None:  # the stopping rule travels with the step, so an ETA can use it
            progress(
                {
                    "step": step,
                    "total": spec.max_steps,
                    "loss": float(loss.detach()),
                    "pass@1": measured,
                    "target": spec.target_pass,
                }
            )
        if measured is not None and measured >= spec.target_pass:
            break
        if checkpoint is not None and checkpoint.due(step):
            checkpoint.save(step, model, opt, rng, info)
    return model, info


class LoadedPolicy(NamedTuple):
    """What ``load_policy_and_task`` returns; unpacks as (model, tokenizer, task, warm_start)."""

    model: torch.nn.Module  # on the requested device, in eval mode
    tokenizer: transformers.PreTrainedTokenizerBase
    task: Task
    warm_start: dict  # the warm start's ``info`` (see ``warm_start``); {} for a given model


def load_policy_and_task(
    cfg: TrainConfig, device: torch.device, callback: Callable[[str, dict], None] | None = None
) -> LoadedPolicy:
    """The policy and task a configuration names: ``cfg.model`` (a local directory) or the warm start.

    Args:
        cfg: reads ``model`` (None: the embedded tiny policy, warm-started on ``task``),
            ``dataset`` (a Parquet task; needs ``model``) and ``task`` (a built-in task name).
        device: where the policy goes.
        callback: told ``warm_start`` ({"task"}) and ``warm_start_progress`` ({"step", "total" (the
            cap), "loss", "pass@1" (None between checks), "target" (the pass@1 that stops it)})
            while a warm start trains or loads.

    Returns:
        ``LoadedPolicy``; a dataset without a model is one error line.
    """
    if cfg.dataset and not cfg.model:
        raise EntropyLabError(
            "--dataset needs --model: the embedded tiny policy only knows the built-in tasks"
        )
    if cfg.model:
        model, tokenizer = load_policy(cfg.model, device)
        task = load_dataset_task(cfg.dataset, tokenizer) if cfg.dataset else build_task(cfg.task, tokenizer)
        return LoadedPolicy(model, tokenizer, task, {})
    task = get_task(cfg.task)
    tell = callback or (lambda event, info: None)
    tell("warm_start", {"task": task.name})
    model, tokenizer, info = warm_start(
        task, progress=lambda step_info: tell("warm_start_progress", step_info)
    )
    return LoadedPolicy(model.to(device), tokenizer, task, info)
