"""Freed big buffers go back to the operating system.

glibc serves a block of 128 KiB or more from its own mapping, but each time such a block is freed it
raises that threshold to the block's size (up to 32 MiB). After one 25 MB message, the next big buffers
come from the heap and stay in the process's RSS once freed: the intake kept ~70 MB after one 25 MB
message. A fixed threshold also turns that adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
BIG_BLOCK = 1024 * 1024  # below this, messages and their copies take the heap as before


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def trim() -> bool:
    """Hands the free pages inside malloc's heaps back (glibc's malloc_trim). Freed small blocks stay in
    their heap otherwise: SQLite's pages of a 25 MB blob write left ~23 MB in the committer thread's
    arena. A walk over the heaps, so called after big messages only. False off glibc."""
    fn = getattr(_libc(), "malloc_trim", None)
    return bool(fn(0)) if fn is not None else False


def return_big_blocks(threshold: int = BIG_BLOCK) -> bool:
    """Blocks of ``threshold`` bytes or more get their own mapping, unmapped on free. False off glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # musl and others: no mallopt, nothing to tune
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
