"""Process-wide CPU settings that training and evaluation need to run at full speed.

Two things that torch leaves as they are and that cost a CPU run dearly:

- Denormal floats. The IWAE gradient weights each sample by its normalised importance
  weight, most of which are below 1e-38, and arithmetic on such denormals runs several
  times slower on x86. torch.set_flush_denormal turns them into zeros, but only in the
  calling thread: the OpenMP threads that run the other half of every parallel op keep
  their own floating-point state. `flush_denormals` sets it in those threads too.
  Measured, IWAE k = 50, batch 20, 784-200-200-50, training on 2 threads: 21.0 ms a step
  with the calling thread flushing, 12.0 ms with every thread flushing (one thread: 20 ms).

- Page faults. glibc's malloc hands blocks above its mmap threshold (128 KiB at first,
  raised on the fly) straight back to the kernel when they are freed, and returns the top
  of its heap once more than the trim threshold is free there. A training step or an
  importance-sampling chunk allocates and frees the same few MiB every time, so each step
  can pay a page fault for every 4 KiB it touches anew. Measured on one thread, an IWAE
  step (k = 50, batch 20, 784-200-200-50, forward and backward): 2748 minor page faults
  and 17.0 ms of CPU time with glibc's defaults, 4 faults and 13.5 ms after
  `keep_freed_memory` (a whole training run, whose other allocations already keep some
  memory in use, gains about 3 %). It raises the mmap threshold to glibc's maximum
  (32 MiB) and the trim threshold to 1 GiB, for the whole process: freed blocks below
  32 MiB stay in the heap for the next step, so the process keeps its peak heap instead of
  handing it back between steps. Larger blocks (data sets) are still returned when freed.
  Set VAEKIT_KEEP_FREED_MEMORY=0 to leave the allocator as it is. Nothing happens outside
  glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from contextlib import contextmanager
from typing import Callable

import torch

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
_OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")  # each exports GOMP_parallel


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds as the module docstring says, once per process; True if they were set."""
    if os.environ.get("VAEKIT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # present in glibc only: mallopt's numbering is glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


@functools.cache
def _gomp_parallel() -> Callable | None:
    """GOMP_parallel of the OpenMP runtime torch has loaded (found in /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
        path = next(p for p in sorted(paths) if os.path.basename(p).startswith(_OPENMP_LIBRARIES))
        fn = ctypes.CDLL(path).GOMP_parallel  # the library is loaded already: this is its handle
    except (OSError, StopIteration, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    fn.restype = None
    return fn


def in_every_thread(action: Callable[[], object]) -> int:
    """Run `action` once in each thread of torch's OpenMP team (this thread included); how many ran it.

    1 (this thread alone) where torch runs without an OpenMP runtime we can reach.
    ctypes drops the GIL for the call, and each thread takes it to run `action`.
    """
    gomp = _gomp_parallel()
    if gomp is None or torch.get_num_threads() == 1:
        action()
        return 1
    ran = []

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def body(_):
        action()
        ran.append(1)

    gomp(ctypes.cast(body, ctypes.c_void_p), None, torch.get_num_threads(), 0)
    return len(ran)


@contextmanager
def flush_denormals():
    """Treat denormal floats as zero in every torch thread while inside (restored to torch's default, off, after).

    Values below 1.2e-38 change nothing a float32 sum of normal-sized terms can hold.
    """
    supported = torch.set_flush_denormal(True)
    if supported:
        in_every_thread(lambda: torch.set_flush_denormal(True))
    try:
        yield
    finally:
        if supported:
            in_every_thread(lambda: torch.set_flush_denormal(False))
