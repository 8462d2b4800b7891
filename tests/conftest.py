"""Tiny random models built from the real configurations of every supported family.

The shapes keep each family's distinguishing features (OPT's biases and ReLU, LLaMA's grouped
query attention, Qwen2's q/k/v biases, Mistral's sliding window) at a size that runs in
milliseconds. A byte-level tokenizer (256 symbols, no merges) lets the CLI run end to end
without any downloaded tokenizer.
"""

from __future__ import annotations

import pytest
import torch


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
    raise ValueError(family)


FAMILIES = ["opt", "llama", "qwen2", "mistral"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
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
