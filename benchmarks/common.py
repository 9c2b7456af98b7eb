"""What the benchmark scripts share besides the timer: their timing options and their Qwen2 model.

Deliberate simplifications: the options are argparse flags with each script's defaults passed
in (no config files); the model is a random-init fp32 Qwen2 built from a config (nothing is
downloaded), with ``transformers`` imported only by the scripts that build one.
"""

from __future__ import annotations

import argparse

import torch

DEVICES = ("auto", "cpu", "cuda")


def add_timing_args(
    parser: argparse.ArgumentParser,
    *,
    repeats: int,
    warmup: int = 1,
    unit: str = "calls of each variant",
    device: bool = False,
) -> None:
    """Add ``--repeats``, ``--warmup``, ``--threads``, ``--json`` and, with ``device``, ``--device``.

    Args:
        parser: the script's parser.
        repeats: default number of timed ``unit`` (the reported time is their median).
        warmup: default number of untimed ``unit`` before them.
        unit: what one repeat times, for the help text.
        device: also add ``--device`` (auto, cpu or cuda; read it with ``pick_device``).
    """
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed {unit} (median)")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed {unit} first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 1 (default) keeps timings stable on a shared machine",
    )
    if device:
        parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when available")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the numbers here")


def pick_device(name: str) -> str:
    """``--device``: "auto" is "cuda" when a GPU is available, else "cpu"; the others as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def qwen2_from_args(args: argparse.Namespace, *, seed: int, **overrides):
    """A Qwen2 causal LM shaped by ``--vocab/--hidden/--layers/--heads/--seq-len``: random init, fp32.

    The MLP is 4x the hidden size, every head has its own key/value head, the context holds at
    least 256 positions, and the embeddings are untied.

    Args:
        args: the parsed options (``vocab``, ``hidden``, ``layers``, ``heads``, ``seq_len``).
        seed: seeds the global torch generator just before the model is built.
        **overrides: further config fields (``attn_implementation="eager"``, ...).

    Returns:
        The model, in training mode as transformers builds it.
    """
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.seq_len),
        tie_word_embeddings=False,
        **overrides,
    )
    return transformers.Qwen2ForCausalLM(cfg)
