"""Bounded calibration memory.

A calibration pass after the first runs every batch twice: once recording the original
activation of EVERY site (``Mode.RECORD``), then fitting on the converted model's own inputs.
What is recorded is the sum of all the norms' activations of the batch: for a ResNet-50 at
224x224 about 36 MB per sample, 2.3 GB for a batch of 64.  :class:`BoundedBatches` splits each
batch into chunks (a divisor of the batch size) so that the recorded activations of one chunk
stay under :data:`RECORD_BUDGET_BYTES`, and reassembles the chunk outputs per batch.  The
calibration statistics are sums over samples, so the fit is the same whatever the chunking.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

from torch import Tensor, nn

from ..data import Dataset
from .calibrate import Batches
from .fidelity import cat_outputs

__all__ = ["BoundedBatches", "RECORD_BUDGET_BYTES", "recorded_bytes_per_sample"]

#: largest recorded activation bytes of one chunk (every site's original output)
RECORD_BUDGET_BYTES = 256 * 2**20


def recorded_bytes_per_sample(sites, element_size: int = 4) -> int:
    """Bytes the RECORD mode keeps per sample: every site's output (the shapes seen so far)."""
    total = 0
    for s in sites:
        shape = s.wrapper.shape_seen
        if shape and len(shape) >= 1:
            total += math.prod(shape[1:]) * element_size
    return total


class BoundedBatches(Batches):
    """:class:`~normswap.convert.calibrate.Batches` whose model runs go in chunks small enough
    that one chunk's recorded activations stay under ``budget`` bytes (default
    :data:`RECORD_BUDGET_BYTES`); ``run`` still yields one output per batch."""

    budget: int | None = None
    #: the chunk size of the last run (for tests and reports)
    last_chunk: int | None = None

    def chunk_size(self) -> int:
        budget = RECORD_BUDGET_BYTES if self.budget is None else int(self.budget)
        elem = 2 if str(self.dtype) in ("torch.float16", "torch.bfloat16") else (8 if str(self.dtype) == "torch.float64" else 4)
        per = recorded_bytes_per_sample(self.sites, elem)
        bs = int(self.batch_size)
        if per <= 0 or per * bs <= budget:
            return bs
        cap = max(1, budget // per)
        return max(d for d in range(1, bs + 1) if bs % d == 0 and d <= cap)

    def _first_chunk(self, x: Tensor, bs: int) -> int:
        """Before any shape is known: the whole batch when even 32x its input bytes (a network's
        norm activations are rarely smaller) fit the budget, else one sample to learn the shapes."""
        budget = RECORD_BUDGET_BYTES if self.budget is None else int(self.budget)
        per_in = x[:1].numel() * x.element_size() if x.shape[0] else 0
        return bs if per_in * bs * 32 <= budget else 1

    def run(self, model: nn.Module, step: Callable[[nn.Module, Tensor], object]):
        """Yield ``step``'s output per batch; each batch (streamed from the data set) runs in
        chunks within the budget.  Before any site has been seen (the first pass), the first
        sample runs alone to learn the shapes."""
        chunks = []
        for x, y in self.data.batches(self.batch_size):
            group, pos, b1 = [], 0, x.shape[0]
            while pos < b1:
                chunk = self.chunk_size() if recorded_bytes_per_sample(self.sites) else self._first_chunk(x, b1)
                chunks.append(chunk)
                end = min(pos + chunk, b1)
                if chunk >= b1 and pos == 0:  # the whole batch at once
                    end = b1
                proxy = copy.copy(self)
                proxy.data = Dataset(x[pos:end], None if y is None else y[pos:end], getattr(self.data, "source", ""))
                proxy.batch_size = end - pos
                for out in Batches.run(proxy, model, step):
                    group.append(out)
                pos = end
            yield cat_outputs(group)
        self.last_chunk = min(chunks[1:] or chunks) if chunks else None
