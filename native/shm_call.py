"""A decoding step's layer call to the one worker that holds every expert of the layer, through shm_call.c.

The dispatcher takes this path for a call of a few tokens (decoding) when no expert of the layer is hot and one
local worker owns them all (every expert cold on a CPU-only machine with one worker, the case the hand-over cost
matters most for): grouping, gathering, the request header, the wait and the combine run in C, bit for bit what
the Python path does (tests/test_transport.py holds them equal). Everything else stays in coordinator/dispatch.py.
"""

from __future__ import annotations

import ctypes

import torch

from fiddler_moe.native import kernels
from fiddler_moe.native.limits import MAX_PAIRS
from fiddler_moe.protocol.messages import PROTOCOL_VERSION
from fiddler_moe.protocol.shm import ShmChannel


class LayerCall(ctypes.Structure):  # layer_call in fiddler_native.h (its size is checked by tests/test_native.py)
    _fields_ = [("seq", ctypes.c_uint32), ("request_id", ctypes.c_int64), ("experts", ctypes.c_int64),
                ("expert_ids", ctypes.c_int64 * MAX_PAIRS), ("row_counts", ctypes.c_int64 * MAX_PAIRS),
                ("row_of", ctypes.c_int64 * MAX_PAIRS), ("compute_seconds", ctypes.c_double)]


def takes(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> bool:
    """Whether the tensors of a call suit the C path (bfloat16 rows on the CPU, contiguous; int64 routing)."""
    return (hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and hidden.dim() == 2
            and hidden.is_contiguous() and top_k_index.dtype == torch.int64 and top_k_index.is_contiguous()
            and top_k_index.numel() <= MAX_PAIRS and top_k_weights.dtype in (torch.float32, torch.bfloat16)
            and top_k_weights.is_contiguous() and top_k_weights.device.type == "cpu" and kernels.available())


class ShmCall:
    """One worker's slot, for calls through shm_call.c; made per channel (it holds the slot's addresses)."""

    def __init__(self, channel: ShmChannel):
        self.channel = channel
        self._slots = channel.slot_addresses()
        self.call = LayerCall()

    def post(self, hidden: torch.Tensor, top_k_index: torch.Tensor, request_id: int, layer: int) -> bool:
        """Send the call; False (nothing sent) when shm_call.c does not take it."""
        tokens, top_k = top_k_index.shape
        posted = kernels.library().fiddler_post_layer_call(
            ctypes.byref(self._slots), hidden.data_ptr(), top_k_index.data_ptr(), tokens, top_k, hidden.shape[1],
            request_id, layer, PROTOCOL_VERSION, ctypes.byref(self.call))
        if posted:
            self.channel.last_request_seq = self.call.seq
        return bool(posted)

    def routed(self) -> list[tuple[int, int]]:
        """(expert, pairs) of the posted call, in expert order."""
        call = self.call
        return [(call.expert_ids[i], call.row_counts[i]) for i in range(call.experts)]

    def order(self) -> list[int]:
        """The (token, k) pair in each request row: the Python path's `order`."""
        pairs = self.call.row_of
        order = [0] * sum(count for _, count in self.routed())
        for pair in range(len(order)):
            order[pairs[pair]] = pair
        return order

    def finish(self, top_k_weights: torch.Tensor, layer: int, width: int, timeout_s: float,
               result: torch.Tensor) -> int:
        """Wait up to timeout_s for the reply and combine it into `result`: 1 done, 0 not yet, -1 the reply is
        something else (decode it in Python)."""
        tokens, top_k = top_k_weights.shape
        return kernels.library().fiddler_finish_layer_call(
            ctypes.byref(self._slots), ctypes.byref(self.call), tokens, top_k, width, layer, PROTOCOL_VERSION,
            top_k_weights.data_ptr(), int(top_k_weights.dtype == torch.bfloat16), int(timeout_s * 1e9),
            int(200e-6 * 1e9) if self.channel.spin else 0, int(self.channel.sleep is kernels.parked_wait),
            result.data_ptr())
