"""The interface between the pruning code and one model family.

The algorithm never names `fc1` or `down_proj`: an adapter returns the real `nn.Linear`
modules of a decoder layer's MLP, and the pipeline works on those. One adapter per family,
looked up by `config.model_type` (see __init__.py), so local folders and GGUF files work as
well as Hub ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn


class MLPAdapter(ABC):
    """Accessors for the MLP of every decoder layer of one model family."""

    model_types: ClassVar[tuple[str, ...]]
    #: config attribute holding the MLP width (n)
    width_key: ClassVar[str]
    #: entry of `in_linears` whose output enters X linearly (gated MLPs: "up"); None if none
    linear_key: ClassVar[str | None] = None

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def in_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Linears whose output rows are the MLP channels (gate/up, or fc1). The first one's
        input is the MLP input."""

    @abstractmethod
    def out_linear(self, layer: nn.Module) -> nn.Linear:
        """The down projection, whose input columns are the MLP channels."""

    @abstractmethod
    def activation(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's nonlinearity."""

    @abstractmethod
    def mlp_output(
        self, linears: dict[str, nn.Linear], down: nn.Linear, act: Callable, a: torch.Tensor
    ) -> torch.Tensor:
        """MLP output for input a, computed from the given modules (used to measure a pruned
        layer against a copy of its dense MLP)."""

    def gate_act(self, layer: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
        """For gated MLPs, act(gate(a)) (tokens, n): fixed while `linear_key` is refit."""
        return None

    def can_add_down_bias(self, config) -> bool:
        """Whether a saved model can carry a bias on the down projection."""
        return self.out_bias_attr(config) is not None

    def out_bias_attr(self, config) -> str | None:
        """Config flag that turns on MLP biases in this family, if one exists."""
        return None

    def width(self, config) -> int:
        return int(getattr(config, self.width_key))
