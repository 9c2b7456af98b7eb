"""Peak resident memory of this process on Linux, for the benchmarks' CPU memory measurements.

A measurement runs in a fresh process: ``release_free_heap()``, ``reset_peak_rss()``, read
``proc_status_kib("VmRSS")`` as the baseline, do the work, read ``proc_status_kib("VmHWM")`` (the
peak since the reset). Not ``ru_maxrss``: Linux carries the parent's peak into a child across
fork + exec. PyTorch's CPU allocator has no cache, so the resident set tracks the tensors alive
at once, to a resolution of about a MiB.
"""

from __future__ import annotations

import ctypes


def proc_status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB, e.g. VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so a small peak is not hidden by
    pages that are resident but free; a no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
