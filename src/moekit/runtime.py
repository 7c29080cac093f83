"""Keep freed CPU memory in the process instead of handing it back to the system (glibc).

Why: glibc's malloc serves blocks over 32 MB with mmap and unmaps them when they are freed, so a
tensor that large allocated afresh every step (the hidden activations of a routed layer at 8192 rows
and more, and their gradients) is page-faulted in again every step: 25,000-76,000 minor faults per
step, 10-25% of the step (benchmarks/RESULTS.md). Told to serve every block from its heap and never
trim it, glibc hands the same memory back step after step. moekit already reuses the memory of the
experts' weight gradients (:mod:`moekit.nn.grouped_mm`); this covers every other tensor.

It is a setting of the whole process, so it is the caller's choice, made once at start-up: memory
freed afterwards stays with the process (its resident size never shrinks). jemalloc or tcmalloc,
preloaded (as ``python -m torch.backends.xeon.run_cpu`` does), have the same effect.

Example:
    >>> import moekit
    >>> moekit.keep_freed_memory()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from its heap (no mmap) and never trim the heap.

    Returns whether the setting took effect: False where the C library is not glibc (macOS,
    Windows, musl), which leaves the process as it was.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
