"""How many threads a client's native libraries run: torch's and numpy's BLAS."""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits

_blas_threads: int | None = None  # what this process's BLAS was last limited to


def use_threads(count: int) -> None:
    """Run torch's intra-op work and numpy's BLAS calls on ``count`` threads (a client's
    ``num-cpus``).

    BLAS matters as much as torch: OpenBLAS splits a long dot product (the entropy coder's
    estimate of a mask's coded length) over one thread per core, and its idle threads then
    spin before they sleep. On 2 cores that spinning took a core from the next client's
    training: a FedPM client with entropy-coded uploads spent 2x the CPU in training that
    its own thread did. The BLAS limit is set once per process and count (it costs 0.7 ms);
    with the in-process engine it is the whole process's, server included.
    """
    global _blas_threads
    torch.set_num_threads(count)
    if _blas_threads != count:
        threadpool_limits(count, user_api="blas")
        _blas_threads = count
