"""The expert function: the same arithmetic transformers' experts modules perform for one expert.

Used by the workers for cold experts and by the coordinator for hot experts, so a token gets the same result
wherever its expert runs. Layout follows transformers' fused experts: gate_up is [2 * intermediate, hidden] with
the gate half first (or [hidden, 2 * intermediate] when transposed), down is [hidden, intermediate].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from protocol.messages import KernelSpec


@dataclass
class ExpertWeights:
    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = [self.gate_up, self.down, self.gate_up_bias, self.down_bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> ExpertWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ExpertWeights(move(self.gate_up), move(self.down), move(self.gate_up_bias), move(self.down_bias))


class ExpertKernel:
    """Computes experts for rows of activations according to a KernelSpec."""

    def __init__(self, spec: KernelSpec):
        if spec.activation not in ACT2FN:
            raise ValueError(f"unknown activation {spec.activation!r} in the model config")
        self.spec = spec
        self.act = ACT2FN[spec.activation]

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = x @ weight if self.spec.is_transposed else torch.nn.functional.linear(x, weight)
        return out if bias is None else out + bias

    @torch.inference_mode()
    def forward(self, weights: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        h = self._linear(x.to(weights.gate_up.dtype), weights.gate_up, weights.gate_up_bias)
        if self.spec.has_gate:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self._linear(h, weights.down, weights.down_bias)
