"""An MLP layout as data, and the one adapter that reads it.

Every dense decoder family in transformers stores its MLP in one of three shapes:

- gated, separate:  down(act(gate(a)) * up(a))          (LLaMA, Qwen, Gemma, ...)
- gated, fused:     g, u = gate_up(a).chunk(2); down(act(g) * u)   (Phi-3, GLM-4)
  channel i is row i (gate) and row n + i (up) of gate_up
- plain:            down(act(up(a)))                     (OPT, Phi, GPT-NeoX, Nemotron, ...)

A `Family` says where the modules are and which config fields matter; `FamilyAdapter`
implements the `MLPAdapter` interface from it, so adding a family that follows one of these
shapes is one line in families.py and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .base import MLPAdapter, set_linear


@dataclass(frozen=True)
class BiasFlag:
    """How a saved config of the family carries MLP biases.

    `name` is the config flag (None: the MLP linears always have biases). `mlp_only` is False
    when the flag also adds biases elsewhere (attention): then it cannot be turned on after
    pruning, and a model saved without it cannot take a new down-projection bias.
    """

    name: str | None
    mlp_only: bool = True


ALWAYS_BIAS = BiasFlag(None)


@dataclass(frozen=True)
class Family:
    """Where one family keeps its MLP. Paths are dotted attribute names: `layers` from the
    causal-LM model, the others from a decoder layer."""

    up: str  # the projection whose rows are the channels (fused: [gate; up], 2n rows)
    down: str
    act: str  # the nonlinearity module
    gate: str | None = None  # separate gate projection of a gated MLP
    fused: bool = False  # `up` is a fused gate_up projection
    layers: str = "model.layers"
    width_key: str = "intermediate_size"
    bias: BiasFlag | None = None  # None: a saved config cannot carry MLP biases

    @property
    def gated(self) -> bool:
        return self.fused or self.gate is not None

    def with_(self, **changes) -> Family:
        return replace(self, **changes)

    def formula(self) -> str:
        """The MLP as a short expression of the module names (for the README)."""
        name = {k: getattr(self, k).rsplit(".", 1)[-1] for k in ("up", "down")}
        if self.fused:
            return f"`{name['down']}(act(g) * u)`, `g, u = {name['up']}(x).chunk(2)`"
        if self.gate is not None:
            gate = self.gate.rsplit(".", 1)[-1]
            return f"`{name['down']}(act({gate}(x)) * {name['up']}(x))`"
        return f"`{name['down']}(act({name['up']}(x)))`"


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class FamilyAdapter(MLPAdapter):
    """The `MLPAdapter` of any family described by a `Family`.

    `wrapper_layers` is set for a multimodal wrapper whose language model is this family: the
    path to its decoder layers, with the family's fields read from `config.text_config`.
    """

    def __init__(self, model_type: str, family: Family, wrapper_layers: str | None = None):
        self.model_type = model_type
        self.family = family
        self.width_key = family.width_key
        self.linear_key = "up" if family.gated else None
        self._layers = wrapper_layers or family.layers
        self._wrapped = wrapper_layers is not None

    def __repr__(self) -> str:
        return f"FamilyAdapter({self.model_type!r}, {self.family})"

    # ---- structure ------------------------------------------------------------------------
    def layers(self, model):
        return _get(model, self._layers)

    def in_linears(self, layer):
        f = self.family
        if f.fused:
            return {"gate_up": _get(layer, f.up)}
        if f.gate is not None:
            return {"gate": _get(layer, f.gate), "up": _get(layer, f.up)}
        return {"up": _get(layer, f.up)}

    def out_linear(self, layer):
        return _get(layer, self.family.down)

    def activation(self, layer):
        return _get(layer, self.family.act)

    # ---- channels as tensors -------------------------------------------------------------
    def channel_rows(self, linears):
        if not self.family.fused:
            weights = {role: lin.weight for role, lin in linears.items()}
            biases = {role: lin.bias for role, lin in linears.items() if lin.bias is not None}
            return weights, biases
        lin = linears["gate_up"]
        n = lin.weight.shape[0] // 2
        weights = {"gate": lin.weight[:n], "up": lin.weight[n:]}  # (n, d) each
        biases = {"gate": lin.bias[:n], "up": lin.bias[n:]} if lin.bias is not None else {}
        return weights, biases

    def write_in(self, layer, weights, biases):
        if self.family.fused:  # gate rows first, then up rows, as chunk(2) reads them
            rows = {"gate_up": (torch.cat([weights["gate"], weights["up"]]),  # (2k, d)
                                torch.cat([biases["gate"], biases["up"]]) if biases else None)}
        else:
            rows = {role: (w, biases.get(role)) for role, w in weights.items()}
        for role, lin in self.in_linears(layer).items():
            w, b = rows[role]
            if lin.bias is not None and b is None:
                raise ValueError(f"{self.model_type}: the {role} projection needs its bias")
            set_linear(lin, w, b)

    def mlp_forward(self, weights, biases, w_down, b_down, act, a):
        def proj(role):
            return F.linear(a, weights[role], biases.get(role))

        x = act(proj("gate")) * proj("up") if self.family.gated else act(proj("up"))  # (p, n)
        return F.linear(x, w_down, b_down)

    def gate_act(self, layer, a):
        if not self.family.gated:
            return None
        weights, biases = self.channel_rows(self.in_linears(layer))
        return self.activation(layer)(F.linear(a, weights["gate"], biases.get("gate")))

    # ---- config -------------------------------------------------------------------------
    def text_config(self, config):
        return config.text_config if self._wrapped else config

    def out_bias_attr(self, config):
        flag = self.family.bias
        if flag is None or flag.name is None:
            return None
        if flag.mlp_only or getattr(self.text_config(config), flag.name, False):
            return flag.name
        return None

    def can_add_down_bias(self, config):
        flag = self.family.bias
        return flag is not None and (flag.name is None or self.out_bias_attr(config) is not None)
