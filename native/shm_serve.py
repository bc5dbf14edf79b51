"""A worker's decoding requests served from the shared-memory slot by shm_serve.c, without Python per request.

The worker registers the experts the C loop can compute (gated SiLU experts without biases in bfloat16, the fused
kernel of bf16_gemv.c, or quantized ones with bfloat16 activations, quant_gemv.c's, on CPUs where native/build.py
builds it) and hands the slot to the loop; the loop
returns whenever something needs Python: a request it does not take (left in the slot for the generic path), a
control message, a timeout. Built into the kernel library; where it is not built, `ShmServeLoop.build` gives None
and Python serves every request.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch

from fiddler_moe.native import kernels
from fiddler_moe.protocol.messages import PROTOCOL_VERSION
from fiddler_moe.protocol.shm import ShmChannel

class _Expert(ctypes.Structure):  # lane_expert in fiddler_native.h
    _fields_ = [("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("gate_up_scale", ctypes.c_void_p),
                ("down_scale", ctypes.c_void_p)]


class ShmServeLoop:
    """The C loop over one channel and one shard. Rebuild it when either changes: it holds their addresses."""

    def __init__(self, channel: ShmChannel, table: ctypes.Array, layers: int, experts: int, hidden: int,
                 inter: int, format: int = 0, bf16_isa: int = 0):
        self.channel = channel
        self._slots = channel.slot_addresses()
        self._table, self.layers, self.experts, self.hidden, self.inter = table, layers, experts, hidden, inter
        self.format = format  # 0: bfloat16 weights; else the quantized format's id (native/limits.py)
        self.bf16_isa = bf16_isa  # the bfloat16 kernel's path (native/limits.py's BF16_ISA_*; 0: the best)
        self._last = ctypes.c_uint32(0)

    @classmethod
    def build(cls, channel: ShmChannel, shard: dict[tuple[int, int], Any], kernel: Any) -> ShmServeLoop | None:
        """The loop for the experts of `shard` it can compute, or None when it takes none of them. `shard` maps
        (layer, expert) to experts.compute.ExpertWeights or experts.quant.QuantizedExpertWeights and `kernel` is
        the worker's experts.compute.ExpertKernel (duck-typed: this package sits below the expert math)."""
        if not (shard and kernels.available()):
            return None
        first = next(iter(shard.values()))
        if hasattr(first.gate_up, "scale"):
            return cls._build_quantized(channel, shard, kernel)
        if not kernel.fused_silu:
            return None
        hidden, inter = first.down.shape
        probe = torch.empty(1, hidden, dtype=torch.bfloat16)
        served = {key: w for key, w in shard.items()
                  if w.gate_up_bias is None and w.down_bias is None and w.down.shape == (hidden, inter)
                  and kernels.applies_to_expert(probe, w.gate_up, w.down)}
        return cls._over(channel, served, hidden, inter, lambda w: _Expert(w.gate_up.data_ptr(), w.down.data_ptr()),
                         bf16_isa=kernel.bf16_isa)

    @classmethod
    def _build_quantized(cls, channel: ShmChannel, shard: dict[tuple[int, int], Any], kernel: Any
                         ) -> ShmServeLoop | None:
        """The loop over a quantized shard (experts.quant.QuantizedExpertWeights), for bfloat16 activations."""
        first = next(iter(shard.values()))
        hidden, inter = first.down.shape
        if not (kernel.fused_silu_quantized and kernel.spec.dtype == "bfloat16"
                and kernels.quant_applies(torch.empty(1, hidden, dtype=torch.bfloat16), hidden)):
            return None
        served = {key: w for key, w in shard.items()
                  if w.gate_up_bias is None and w.down_bias is None and w.down.shape == (hidden, inter)
                  and w.gate_up.shape == (2 * inter, hidden) and w.gate_up.format == first.gate_up.format}
        return cls._over(channel, served, hidden, inter,
                         lambda w: _Expert(w.gate_up.q.data_ptr(), w.down.q.data_ptr(), w.gate_up.scale.data_ptr(),
                                           w.down.scale.data_ptr()), first.gate_up.code)

    @classmethod
    def _over(cls, channel: ShmChannel, served: dict[tuple[int, int], Any], hidden: int, inter: int,
              entry: Callable[[Any], _Expert], format: int = 0, bf16_isa: int = 0) -> ShmServeLoop | None:
        """The loop over the experts `served`, each registered in the C table by entry(weights)."""
        if not served:
            return None
        layers = 1 + max(layer for layer, _ in served)
        experts = 1 + max(expert for _, expert in served)
        table = (_Expert * (layers * experts))()
        for (layer, expert), w in served.items():
            table[layer * experts + expert] = entry(w)
        return cls(channel, table, layers, experts, hidden, inter, format, bf16_isa)

    def serve(self, timeout_s: float) -> int:
        """Serve requests until one needs Python, a control message rings the bell or timeout_s passes idle.
        Returns how many were served; the channel's request bookkeeping follows."""
        self._last.value = self.channel.last_request_seq
        served = kernels.library().fiddler_serve_requests(
            ctypes.byref(self._slots), ctypes.byref(self._last), self._table, self.layers, self.experts,
            self.hidden, self.inter, self.format, self.bf16_isa, PROTOCOL_VERSION, int(timeout_s * 1e9),
            int(50e-6 * 1e9) if self.channel.spin else 0, int(self.channel.turn_spin_s * 1e9),
            int(self.channel.sleep is kernels.parked_wait))
        self.channel.last_request_seq = self._last.value
        return served
