"""The interface between the pruning code and one model family.

The algorithm never names `fc1` or `down_proj`: an adapter returns the real `nn.Linear`
modules of a decoder layer's MLP, and the MLP's channels as plain tensors, and the pipeline,
surgery and solvers work on those. Adapters are looked up by `config.model_type` (see
__init__.py), so local folders and GGUF files work as well as Hub ids.

Channel i of an MLP is row i of every input projection and column i of the down projection.
The input projections are seen per role, as (n, d) rows: {"gate": ..., "up": ...} for gated
MLPs (whether the checkpoint stores them separately or fused in one `gate_up_proj`), {"up": ...}
for non-gated ones. `in_weights` reads them, `write_in` / `set_in_weights` write them back into
whatever modules the family really has; so a fused projection is cut and refit like two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn


def set_linear(lin: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Replace `lin`'s weight (and its bias, when `b` is given) by new tensors of any shape,
    keeping its device and dtype; `b=None` leaves the bias as it is."""
    ref = lin.weight
    lin.weight = nn.Parameter(w.to(ref.device, ref.dtype).contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.to(ref.device, ref.dtype).contiguous(), requires_grad=False)
    lin.out_features, lin.in_features = lin.weight.shape


class MLPAdapter(ABC):
    """Accessors for the MLP of every decoder layer of one model family."""

    #: the family's `model_type` (for a multimodal wrapper: the wrapper's)
    model_type: str
    #: attribute of `text_config(config)` holding the MLP width (n)
    width_key: str
    #: entry of `in_weights` whose output enters X linearly (gated MLPs: "up"); None if none
    linear_key: str | None = None

    # ---- structure ------------------------------------------------------------------------
    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def in_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The physical linears whose output rows are the MLP channels (gate and up, a fused
        gate_up, or fc1). The first one's input is the MLP input."""

    @abstractmethod
    def out_linear(self, layer: nn.Module) -> nn.Linear:
        """The down projection, whose input columns are the MLP channels."""

    @abstractmethod
    def activation(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's nonlinearity."""

    # ---- channels as tensors -------------------------------------------------------------
    @abstractmethod
    def channel_rows(
        self, linears: dict[str, nn.Linear]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-role channel rows of the given input linears (as `in_linears` returns them):
        weights {role: (n, d)} and biases {role: (n,)} (only roles that have one). The tensors
        may be views of the parameters: clone before writing into them."""

    @abstractmethod
    def write_in(self, layer: nn.Module, weights: dict[str, torch.Tensor],
                 biases: dict[str, torch.Tensor]) -> None:
        """Replace the layer's input projections by these per-role rows (any channel count);
        a projection that has a bias must get one."""

    @abstractmethod
    def mlp_forward(self, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
                    w_down: torch.Tensor, b_down: torch.Tensor | None,
                    act: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor) -> torch.Tensor:
        """The MLP's output for input a (tokens, d), from plain tensors."""

    # ---- derived from the above -------------------------------------------------------------
    def in_weights(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """{role: (n, d)} channel rows of the layer's input projections."""
        return self.channel_rows(self.in_linears(layer))[0]

    def in_biases(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """{role: (n,)} channel biases of the layer's input projections that have one."""
        return self.channel_rows(self.in_linears(layer))[1]

    @torch.no_grad()
    def set_in_weights(self, layer: nn.Module, keep: torch.Tensor,
                       w_in: dict[str, torch.Tensor] | None = None) -> None:
        """Keep channels `keep` of the input projections: their dense rows, or the refit rows
        `w_in[role]` (k, d) where given; biases are sliced."""
        weights, biases = self.channel_rows(self.in_linears(layer))
        idx = {role: keep.to(w.device, torch.long) for role, w in weights.items()}
        new_w = {role: (w_in[role] if w_in and role in w_in else w[idx[role]])
                 for role, w in weights.items()}
        new_b = {role: b[idx[role]] for role, b in biases.items()}
        self.write_in(layer, new_w, new_b)

    def mlp_output(self, linears: dict[str, nn.Linear], down: nn.Linear, act: Callable,
                   a: torch.Tensor) -> torch.Tensor:
        """MLP output for input a, computed from the given modules (used to measure a pruned
        layer against a copy of its dense MLP)."""
        weights, biases = self.channel_rows(linears)
        return self.mlp_forward(weights, biases, down.weight, down.bias, act, a)

    def gate_act(self, layer: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
        """For gated MLPs, act(gate(a)) (tokens, n): fixed while `linear_key` is refit."""
        return None

    # ---- config -------------------------------------------------------------------------
    def text_config(self, config):
        """The config that holds the language model's fields (the config itself, or a
        multimodal wrapper's `text_config`)."""
        return config

    def width(self, config) -> int:
        return int(getattr(self.text_config(config), self.width_key))

    def set_width(self, config, n: int) -> None:
        setattr(self.text_config(config), self.width_key, int(n))

    def out_bias_attr(self, config) -> str | None:
        """Config flag (of `text_config(config)`) that a saved model sets to carry MLP
        biases, if one may be set without adding biases elsewhere."""
        return None

    def can_add_down_bias(self, config) -> bool:
        """Whether a saved model can carry a bias on the down projection."""
        return self.out_bias_attr(config) is not None
