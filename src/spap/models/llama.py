"""Gated MLPs: down(act(gate(a)) * up(a)), in `layer.mlp`, width `intermediate_size`.

The same module layout is shared by LLaMA, Qwen2, Mistral (and others): one adapter serves
them all. Qwen2's q/k/v biases live in attention and are left untouched.
"""

from __future__ import annotations

from .base import MLPAdapter


class GatedMLPAdapter(MLPAdapter):
    model_types = ("llama", "qwen2", "mistral")
    width_key = "intermediate_size"
    linear_key = "up"

    def layers(self, model):
        return model.model.layers

    def in_linears(self, layer):
        return {"gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj}

    def out_linear(self, layer):
        return layer.mlp.down_proj

    def activation(self, layer):
        return layer.mlp.act_fn

    def mlp_output(self, linears, down, act, a):
        return down(act(linears["gate"](a)) * linears["up"](a))

    def gate_act(self, layer, a):
        return layer.mlp.act_fn(layer.mlp.gate_proj(a))

    def out_bias_attr(self, config):
        # LLaMA's `mlp_bias` adds biases to gate, up and down; Qwen2 and Mistral have no such flag.
        return "mlp_bias" if hasattr(config, "mlp_bias") else None
