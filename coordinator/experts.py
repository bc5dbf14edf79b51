"""The `fiddler` experts implementation, registered in transformers' ExpertsInterface.

transformers calls it in place of its own experts forward with (hidden_states, top_k_index, top_k_weights);
it hands the call to the dispatcher attached to that experts module, which knows where each expert lives.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface

IMPLEMENTATION_NAME = "fiddler"


def fiddler_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    dispatcher = getattr(self, "fiddler_dispatcher", None)
    if dispatcher is None:
        raise RuntimeError(
            "this experts module has no fiddler dispatcher; build models through coordinator.Coordinator"
        )
    return dispatcher.forward(self.fiddler_layer, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION_NAME, fiddler_experts_forward)
