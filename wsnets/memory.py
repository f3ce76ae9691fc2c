"""Keeping a long CPU job's memory near what it uses.

Training a graph meta-model allocates and frees, every batch, tensors of sizes that change with the
batch's networks (tens of kilobytes to tens of megabytes). glibc's ``malloc`` serves large blocks with
``mmap`` only above a threshold that it raises by itself after such a block is freed (up to 32 MB); below
that threshold they come from the heap, whose freed holes of the wrong sizes are kept: the process grows by
hundreds of megabytes per epoch while the live tensors stay the same (the main job: 4.2 GB at the graph
encoder's 8th epoch and rising; with a fixed threshold, 1.2 GB at most over all 15 epochs and every number
the same; benchmarks/results/main_job.md). :func:`tame_allocator` fixes the threshold and lets ``free`` return the top
of the heap; the CLI calls it at start, as does :func:`wsnets.run.run`; a script can call it once.
``wsnets zoo build`` sets a 32 MB threshold instead (:mod:`wsnets.zoo.cli`): its training steps free and
allocate the same sizes every step, and above a 1 MB threshold each was a fresh mapping to fault in and zero.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # bytes: blocks above go to mmap and back to the system when freed


def tame_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = 1 << 20) -> bool:
    """Fix glibc malloc's mmap threshold (which it otherwise raises by itself) and its trim threshold, for
    this process and the processes it forks. Returns whether it applied (glibc only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))

