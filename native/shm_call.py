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
    """Whether the tensors of a call suit the C path (bfloat16 rows on the CPU, contiguous; int64 routing). Called
    for every layer of a decoding step: properties that build no objects (`is_cpu`, not `device.type`), the cheap
    and likely-false checks first."""
    return (top_k_index.numel() <= MAX_PAIRS and hidden.dtype is torch.bfloat16 and hidden.is_cpu
            and top_k_index.dtype is torch.int64 and top_k_weights.is_cpu
            and top_k_weights.dtype in (torch.float32, torch.bfloat16) and hidden.dim() == 2
            and hidden.is_contiguous() and top_k_index.is_contiguous() and top_k_weights.is_contiguous()
            and kernels.available())


class ShmCall:
    """One worker's slot, for calls through shm_call.c; made per channel (it holds the slot's addresses)."""

    def __init__(self, channel: ShmChannel):
        self.channel = channel
        self._slots = channel.slot_addresses()
        self.call = LayerCall()
        library = kernels.library()
        self._post, self._finish = library.fiddler_post_layer_call, library.fiddler_finish_layer_call
        self._slots_ref, self._call_ref = ctypes.byref(self._slots), ctypes.byref(self.call)
        self._spin_ns = int(200e-6 * 1e9) if channel.spin else 0
        self._park = int(channel.sleep is kernels.parked_wait)
        self._finish_head: tuple = ()
        self._finish_tail: tuple = ()

    def post(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, request_id: int,
             layer: int, result: torch.Tensor) -> bool:
        """Send the call, whose reply `finish` combines with top_k_weights into `result` (the caller keeps both
        alive until then); False (nothing sent) when shm_call.c does not take it. finish's arguments are made
        here, before the worker's turn: after it every Python step runs from cold caches."""
        tokens, top_k = top_k_index.shape
        width = hidden.shape[1]
        self._finish_head = (self._slots_ref, self._call_ref, tokens, top_k, width, layer, PROTOCOL_VERSION,
                             top_k_weights.data_ptr(), int(top_k_weights.dtype is torch.bfloat16))
        self._finish_tail = (self._spin_ns, self._park, result.data_ptr())
        posted = self._post(self._slots_ref, hidden.data_ptr(), top_k_index.data_ptr(), tokens, top_k, width,
                            request_id, layer, PROTOCOL_VERSION, self._call_ref)
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

    def finish(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the posted call's reply and combine it into its `result`: 1 done, 0 not yet, -1
        the reply is something else (decode it in Python)."""
        return self._finish(*self._finish_head, int(timeout_s * 1e9), *self._finish_tail)
