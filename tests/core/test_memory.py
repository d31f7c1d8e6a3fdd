"""relay.memory: a freed big buffer leaves the process's RSS (glibc), also after the first one."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys
from pathlib import Path
from relay.memory import return_big_blocks

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

tuned = sys.argv[1] == "tuned"
if tuned:
    assert return_big_blocks()
base = rss_mb()
first = bytes(bytearray(30_000_000))  # glibc maps it, and raises its threshold when it is freed
del first
second = bytes(bytearray(20_000_000))  # untuned: carved from the heap this time
del second
print(round(rss_mb() - base))
"""


def _kept_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_big_buffers_are_returned_after_the_first_one():
    assert _kept_mb("tuned") < 5
    assert _kept_mb("plain") > 15  # the behaviour the setting exists for (glibc's dynamic threshold)
