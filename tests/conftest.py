"""Tiny random models built from the real configurations of every supported family.

The shapes keep each family's distinguishing features (OPT's biases and ReLU, LLaMA's grouped
query attention, Qwen2's q/k/v biases, Mistral's sliding window, Phi-3's fused gate_up_proj,
Falcon's multi-query attention, ...) at a size that runs in milliseconds. `FAMILIES` are the
four the pipeline tests run every method on; `ALL_FAMILIES` is every supported model_type
(test_adapters.py runs the adapter contract on each). A byte-level tokenizer (256 symbols, no
merges) lets the CLI run end to end without any downloaded tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def _mechanics_level(request, monkeypatch):
    """SPAP's default level (solvers/presets.py) runs recovery for up to 16 epochs of 64
    steps, which on tiny random models costs minutes per test and tests nothing the
    mechanics tests check: there, spap runs at effort "none" (its solver's own option
    defaults) unless the test is marked `default_level` or passes a level itself. Spawned
    processes do not see this: tests that spawn pass `effort` explicitly."""
    if request.node.get_closest_marker("default_level"):
        return
    from spap.solvers import presets

    monkeypatch.setitem(presets.DEFAULT_LEVEL, "spap", "none")


def bench_script(name: str):
    """bench/<name>.py loaded as a module (the bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_config(family: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "opt":  # facebook/opt-125m, shrunk
        return OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
                         num_attention_heads=4, max_position_embeddings=256,
                         word_embed_proj_dim=64, do_layer_norm_before=True,
                         activation_function="relu", enable_bias=True, pad_token_id=1)
    if family == "llama":  # meta-llama/Llama-3.2-1B, shrunk: GQA, tied embeddings
        return LlamaConfig(**common, intermediate_size=96, num_key_value_heads=2,
                           rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                           hidden_act="silu")
    if family == "qwen2":  # Qwen/Qwen2.5-0.5B, shrunk: GQA, q/k/v biases
        return Qwen2Config(**common, intermediate_size=96, num_key_value_heads=2,
                           tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="silu")
    if family == "mistral":  # mistralai/Mistral-7B-v0.1, shrunk: sliding window
        return MistralConfig(**common, intermediate_size=96, num_key_value_heads=2,
                             sliding_window=32, hidden_act="silu")
    if family in _MORE:
        return _more_config(family)
    raise ValueError(family)


FAMILIES = ["opt", "llama", "qwen2", "mistral"]

# Every other supported family, built by its own config class through AutoConfig: the shared
# shape below plus what the family needs (sliding windows short enough to matter at 16-24
# tokens, its own width key, its bias flag on where it has MLP biases by default).
_DECODER = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GQA = dict(_DECODER, num_key_value_heads=2, head_dim=16, intermediate_size=96)
_WINDOW = dict(_GQA, sliding_window=8)
_MORE: dict[str, dict] = {
    "qwen3": _GQA,
    "ministral": _WINDOW,
    "gemma": dict(_GQA, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": dict(_WINDOW, query_pre_attn_scalar=16),
    "gemma3_text": dict(_WINDOW, query_pre_attn_scalar=16),
    "granite": dict(_GQA, mlp_bias=True),  # granite's MLP biases, exercised
    "olmo2": _GQA,
    "olmo3": _WINDOW,
    "smollm3": _GQA,
    "cohere": _GQA,
    "cohere2": _WINDOW,
    "stablelm": _GQA,
    "helium": _GQA,
    "exaone4": _WINDOW,
    "seed_oss": _GQA,
    "hunyuan_v1_dense": _GQA,
    "ernie4_5": _GQA,
    "phi3": _GQA,  # fused gate_up_proj
    "glm4": _GQA,  # fused gate_up_proj
    "nemotron": _GQA,  # relu^2
    "arcee": _GQA,  # relu^2
    "apertus": dict(_GQA, max_position_embeddings=8192),  # xIELU; its rope wants 8192
    "phi": dict(_DECODER, intermediate_size=96),  # fc1/fc2 with biases
    "starcoder2": dict(_GQA, sliding_window=8),  # c_fc/c_proj with biases
    "gpt_neox": dict(_DECODER, intermediate_size=96),  # dense_h_to_4h, always biased
    "falcon": dict(_DECODER, ffn_hidden_size=96),  # dense_h_to_4h, multi-query attention
}


def _more_config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **_MORE[family])


def gemma3_multimodal_config():
    """A Gemma-3 image-text checkpoint: the gemma3_text language model above plus a tiny
    SigLIP vision tower (14-pixel patches of a 28-pixel image, 4 image tokens)."""
    from transformers import Gemma3Config

    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    text = {k: v for k, v in _MORE["gemma3_text"].items() if k not in _TOKEN_IDS}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                        image_token_index=255, boi_token_index=253, eoi_token_index=254,
                        **{k: _DECODER[k] for k in _TOKEN_IDS})


_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")

#: every supported model_type with a tiny model (the adapter contract runs on each)
ALL_FAMILIES = [*FAMILIES, *_MORE, "gemma3"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = gemma3_multimodal_config() if family == "gemma3" else tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves biases at zero; give Qwen2's q/k/v and OPT's biases real values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@contextlib.contextmanager
def product_tokens(n: int):
    """Recovery's bf16 closed-form products over at most `n` tokens inside the block (a
    spawned rank sets it in its own process too), so that each rank's share can be whole
    product groups (recovery.py's precision)."""
    from spap.solvers import recovery

    recovery.PRODUCT_TOKENS, before = n, recovery.PRODUCT_TOKENS
    try:
        yield
    finally:
        recovery.PRODUCT_TOKENS = before


def random_ids(n: int, seqlen: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes whole channels of a "
    "network's feed-forward layers and refits the rest so the output barely changes. "
)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    # paragraphs, so the file splits into calibration and evaluation parts (data._local)
    p.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    return p


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random LLaMA saved with the byte tokenizer, as a user's local folder."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def run_cli(argv, capsys):
    """Run `spap ARGV`; return (exit code, stdout, stderr)."""
    from spap.cli import main

    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err
