"""Freed big buffers go back to the operating system.

glibc serves a block of 128 KiB or more from its own mapping, but each time such a block is freed it
raises that threshold to the block's size (up to 32 MiB). After one 25 MB message, the next big buffers
come from the heap and stay in the process's RSS once freed: the intake kept ~70 MB after one 25 MB
message. A fixed threshold also turns that adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
BIG_BLOCK = 1024 * 1024  # below this, messages and their copies take the heap as before


def return_big_blocks(threshold: int = BIG_BLOCK) -> bool:
    """Blocks of ``threshold`` bytes or more get their own mapping, unmapped on free. False off glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
