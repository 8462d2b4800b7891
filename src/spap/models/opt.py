"""OPT: fc2(act(fc1(a) + b1)) + b2, with fc1/fc2 on the decoder layer and width `ffn_dim`."""

from __future__ import annotations

from .base import MLPAdapter


class OPTAdapter(MLPAdapter):
    model_types = ("opt",)
    width_key = "ffn_dim"
    linear_key = None  # the ReLU sits between fc1 and X: no input projection enters linearly

    def layers(self, model):
        return model.model.decoder.layers

    def in_linears(self, layer):
        return {"fc1": layer.fc1}

    def out_linear(self, layer):
        return layer.fc2

    def activation(self, layer):
        return layer.activation_fn

    def mlp_output(self, linears, down, act, a):
        return down(act(linears["fc1"](a)))

    def out_bias_attr(self, config):
        # fc2 already has a bias when enable_bias is set (the OPT default); turning the flag on
        # later would add biases to attention too, so a bias-free OPT cannot take one.
        return "enable_bias" if getattr(config, "enable_bias", True) else None
