"""Large CPU buffers of the head pass, kept by a profiler from one measurement to the next.

The projection form's head pass writes V×H gradients (one per forget sample and one per retain batch) and a
logits chunk: hundreds of MiB, allocated afresh by every measurement. On the CPU a block that large is mapped
fresh by the allocator and every 4 KiB page of it faults on first write; since their size does not depend on
the tokens, those faults weigh most on short batches. They are lent from a pool instead, at the price of the
memory it keeps between measurements (benchmarks/test_geffect.py; docs/DESIGN.md §4). A GPU's caching
allocator already reuses its blocks: there nothing is kept.
"""
from __future__ import annotations

import math

import torch

# Most bytes a pool keeps between measurements; a buffer that would pass it is allocated and freed as usual.
CPU_POOL_BYTES = 1 << 30


class BufferPool:
    """Buffers lent during one measurement (`empty`) and all taken back at its end (`reclaim`), to be lent
    again to the next one. A request takes the smallest free buffer of its dtype and device that is large
    enough (a view of its first elements: row counts vary between measurements); where none is, the free
    ones too small are dropped and a new one is made. Only CPU buffers, at most `CPU_POOL_BYTES`, are kept."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit = CPU_POOL_BYTES if limit_bytes is None else limit_bytes
        self._free: list = []  # flat buffers
        self._lent: list = []
        self.kept_bytes = 0

    def empty(self, shape, dtype, device) -> torch.Tensor:
        """An uninitialized ``shape`` buffer, in the pool's storage where one is free and large enough."""
        device, n = torch.device(device), math.prod(shape)
        kind = [b for b in self._free if b.dtype == dtype and b.device == device]
        fits = [b for b in kind if b.numel() >= n]
        if fits:
            buffer = min(fits, key=torch.Tensor.numel)
            self._free = [b for b in self._free if b is not buffer]  # by identity: == would compare values
        else:
            self._free = [b for b in self._free if all(b is not small for small in kind)]  # outgrown
            self.kept_bytes -= sum(small.numel() * small.element_size() for small in kind)
            buffer = torch.empty(n, dtype=dtype, device=device)
            size = n * buffer.element_size()
            if device.type != "cpu" or self.kept_bytes + size > self.limit:
                return buffer.view(shape)  # not kept: freed with its last reference
            self.kept_bytes += size
        self._lent.append(buffer)
        return buffer[:n].view(shape)

    def reclaim(self):
        """Every buffer lent is free again: call once the measurement that used them holds none."""
        self._free += self._lent
        self._lent = []
