"""Small kernels on one thread.

On a CPU, a kernel this small (a decoding step's per-row attention, a per-row LoRA product: tens of microseconds)
loses more to waking an OpenMP team than it gains from it — far more once another thread of the process has used
torch: its own team then competes for the cores (measured on 2 cores: 3-7x slower attention; the per-row LoRA
products of a 16-task T5 step 369 -> 165 ms per 32 tokens). Only the calling thread's setting changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
