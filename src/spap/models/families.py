"""Every supported family, one line each: `config.model_type` -> where its MLP lives.

The module names, the config key of the MLP width and the bias flag are read from each
family's modeling file in transformers. A family whose MLP follows one of the three layouts
below needs one more line here and nothing else.
"""

from __future__ import annotations

from .layout import ALWAYS_BIAS, BiasFlag, Family

#: down(act(gate(a)) * up(a)) with separate projections, in `layer.mlp`
GATED = Family(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn")
#: the same with gate and up fused in one `gate_up_proj` (gate rows first)
FUSED = Family(up="mlp.gate_up_proj", down="mlp.down_proj", act="mlp.activation_fn", fused=True)
#: down(act(up(a))) (relu^2, xIELU)
UP_DOWN = Family(up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn")

#: a flag that adds biases to the MLP linears only, so it can be turned on after pruning
MLP_BIAS = BiasFlag("mlp_bias")


def _shared(flag: str) -> BiasFlag:
    """A bias flag that also adds attention biases: usable only when already on."""
    return BiasFlag(flag, mlp_only=False)


FAMILIES: dict[str, Family] = {
    "llama": GATED.with_(bias=MLP_BIAS),
    "mistral": GATED,
    "ministral": GATED,
    "qwen2": GATED,  # q/k/v biases live in attention and are left untouched
    "qwen3": GATED,
    "gemma": GATED,
    "gemma2": GATED,
    "gemma3_text": GATED,
    "granite": GATED.with_(bias=MLP_BIAS),
    "olmo2": GATED,
    "olmo3": GATED,
    "smollm3": GATED.with_(bias=MLP_BIAS),
    "cohere": GATED,
    "cohere2": GATED,
    "stablelm": GATED,
    "helium": GATED.with_(bias=MLP_BIAS),
    "exaone4": GATED,
    "seed_oss": GATED.with_(bias=MLP_BIAS),
    "hunyuan_v1_dense": GATED,
    "ernie4_5": GATED.with_(bias=_shared("use_bias")),
    "phi3": FUSED,
    "glm4": FUSED,
    "nemotron": UP_DOWN.with_(bias=MLP_BIAS),
    "arcee": UP_DOWN.with_(bias=MLP_BIAS),
    "apertus": UP_DOWN,
    "opt": Family(up="fc1", down="fc2", act="activation_fn", layers="model.decoder.layers",
                  width_key="ffn_dim", bias=_shared("enable_bias")),
    "phi": Family(up="mlp.fc1", down="mlp.fc2", act="mlp.activation_fn", bias=ALWAYS_BIAS),
    "starcoder2": Family(up="mlp.c_fc", down="mlp.c_proj", act="mlp.act",
                         bias=_shared("use_bias")),
    "gpt_neox": Family(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act",
                       layers="gpt_neox.layers", bias=ALWAYS_BIAS),
    "falcon": Family(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act",
                     layers="transformer.h", width_key="ffn_hidden_size", bias=_shared("bias")),
}

#: multimodal wrappers that stock `AutoModelForCausalLM` loads, whose `text_config` is a family
#: above: the path to the language model's decoder layers. Only those layers are pruned; the
#: vision tower and projector are left as they are.
WRAPPERS: dict[str, str] = {
    "gemma3": "model.language_model.layers",
}
