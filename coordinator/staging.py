"""Cold experts within the coordinator's reach, for the scheduler's moves (coordinator/scheduling.py).

A local worker asked to share its shard (LoadShard.shared) keeps it in one /dev/shm file, every tensor at a known
offset (experts/shard.py). The coordinator maps that file read-only (`MappedShard`) and unlinks its name at
once: both processes keep their mapping, nothing is left in /dev/shm, and the weights exist once in memory. On CUDA
the mapping is page-locked (cudaHostRegister, read-only) so that copies from it run at DMA speed.

When the scheduler moves an expert for one layer call, `Staging` copies its weights from the mapping into one of a
few device buffers and hands back ExpertWeights viewing that buffer, and the dispatcher computes the expert's rows
there. A quantized shard (--quantize int8 or int4) is moved in its format's bytes (2-4x fewer than bfloat16's) and
dequantized on the device into a float32 buffer beside them (experts/quant.py's DequantizedExpertWeights), whose
products quantize their inputs per block as the workers' kernels do: the moved expert computes the format's
function, the same as its worker. On CUDA the copies run on a stream of their own, so the next expert's copy
overlaps this one's compute; events keep a buffer from being overwritten before the compute reading it is done.

Without a GPU nothing is mapped (the scheduler has nothing to move to), unless a test forces moves: then the
buffers are in the coordinator's RAM and the same path runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os

import torch

from fiddler_moe.experts import quant
from fiddler_moe.experts.compute import ExpertWeights
from fiddler_moe.experts.quantized_shard import shared_quantized_views
from fiddler_moe.experts.shard import SHARED_DIR, WEIGHT_NAMES, shared_views
from fiddler_moe.protocol import messages as m

log = logging.getLogger("fiddler.staging")

CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the mapping is PROT_READ
STAGING_BUFFERS = 2  # one expert each: while one is computed, the next is copied


class MappedShard:
    """A worker's shared shard, mapped read-only into the coordinator: `experts` views it, nothing is copied."""

    def __init__(self, ready: m.Ready, dtype: torch.dtype, quantize: str = "none"):
        path = ready.shared_path
        in_shm = os.path.realpath(os.path.dirname(path)) == os.path.realpath(SHARED_DIR)
        if not in_shm or not os.path.basename(path).startswith("fiddler-"):
            raise ValueError(f"refusing to map {path!r}: not a fiddler shared-memory file")
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != ready.shared_bytes:
                raise ValueError(f"{path} has {size} bytes, its worker reported {ready.shared_bytes}")
            self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # both sides hold the mapping now; no name is left behind
        self.path = path
        self.size = size
        self.experts: dict[tuple[int, int], ExpertWeights | quant.QuantizedExpertWeights] = (
            shared_views(self.mm, ready.shared_tensors, dtype) if quantize == "none"
            else shared_quantized_views(self.mm, ready.shared_tensors, quantize))
        self._registered: int | None = None  # base address while page-locked

    def _base(self) -> int:
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=1).data_ptr()

    def pin(self) -> str:
        """Page-lock the mapping for DMA to the GPU. Returns "" when done, else why not (copies still work, from
        pageable memory, slower)."""
        base = self._base()
        error = torch.cuda.cudart().cudaHostRegister(base, self.size, CUDA_HOST_REGISTER_READ_ONLY)
        if int(error) != 0:
            _clear_cuda_error()
            return (f"could not page-lock the shared shard ({self.size / 2**20:.0f} MiB) for the GPU (CUDA error "
                    f"{int(error)}); moved experts are copied from pageable memory")
        self._registered = base
        return ""

    def close(self) -> None:
        if self._registered is not None:
            torch.cuda.synchronize()  # no copy from it may be in flight
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None
        self.experts.clear()
        with contextlib.suppress(BufferError):  # a tensor still views it: released with the process
            self.mm.close()


def _clear_cuda_error() -> None:
    """A failed CUDA runtime call leaves its error behind, and torch's next kernel launch check would report it.
    torch does not bind cudaGetLastError, so call it in the libcudart this process has loaded."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError, IndexError):
        pass


def _planes(weights: ExpertWeights | quant.QuantizedExpertWeights) -> dict[str, torch.Tensor]:
    """The tensors a move copies, by name."""
    if isinstance(weights, quant.QuantizedExpertWeights):
        return weights.planes()
    return {name: getattr(weights, name) for name in WEIGHT_NAMES if getattr(weights, name) is not None}


class Staging:
    """Device buffers for moved experts, each sized for one expert, used in turn; for a quantized shard, each with
    room for the expert dequantized."""

    def __init__(self, template: ExpertWeights | quant.QuantizedExpertWeights, device: torch.device,
                 buffers: int = STAGING_BUFFERS):
        self.device = torch.device(device)
        self.format = template.gate_up.format if isinstance(template, quant.QuantizedExpertWeights) else "none"
        self.buffers = [{name: torch.empty_like(t, device=self.device) for name, t in _planes(template).items()}
                        for _ in range(max(1, buffers))]
        self.dequantized = ([quant.DequantizedExpertWeights.empty_like(template, self.device) for _ in self.buffers]
                            if self.format != "none" else [])
        self.next = 0
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in self.buffers]  # the copy into buffer i is done
            self.free = [torch.cuda.Event() for _ in self.buffers]  # the compute reading buffer i is done

    @property
    def copy_nbytes(self) -> int:
        """Bytes one move copies: the expert in the shard's format."""
        return sum(t.numel() * t.element_size() for t in self.buffers[0].values())

    @property
    def nbytes(self) -> int:
        dequantized = sum(w.gate_up.numel() * 4 + w.down.numel() * 4 for w in self.dequantized)
        return self.copy_nbytes * len(self.buffers) + dequantized

    def load(self, weights: ExpertWeights | quant.QuantizedExpertWeights
             ) -> tuple[int, ExpertWeights | quant.DequantizedExpertWeights]:
        """Copy an expert's weights into the next buffer (and dequantize them there); returns (slot, weights viewing
        the buffer). Call release(slot) once the compute that reads it is enqueued."""
        slot = self.next
        self.next = (slot + 1) % len(self.buffers)
        buffer = self.buffers[slot]
        source = _planes(weights)
        if self.cuda:
            self.stream.wait_event(self.free[slot])
            with torch.cuda.stream(self.stream):
                for name, tensor in buffer.items():
                    tensor.copy_(source[name], non_blocking=True)
            self.copied[slot].record(self.stream)
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        else:
            for name, tensor in buffer.items():
                tensor.copy_(source[name])
        if self.format != "none":  # on the compute stream, after the copy: the dequantized weights of the reference
            return slot, quant.dequantize_expert(quant.QuantizedExpertWeights.from_planes(self.format, buffer),
                                                 into=self.dequantized[slot])
        # A fresh ExpertWeights each time: the kernel may re-lay a CPU expert out in its own copy, never in ours.
        return slot, ExpertWeights(**{name: buffer.get(name) for name in WEIGHT_NAMES})

    def release(self, slot: int) -> None:
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
