"""keep_freed_memory: after it, a 64 MB block freed and allocated again is not page-faulted in
again (counted with getrusage, in a fresh process, since the setting is process-wide)."""

import json
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

CHILD = """
import json, resource, sys
import torch
from moekit.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 * 2**20)  # 64 MB
    block.fill_(1.0)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_memory_is_not_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    pages = 64 * 2**20 // 4096
    assert kept["kept"] is True
    # The last four of 12 rounds: glibc's heap needs a few rounds (up to 6 measured) to settle on
    # one 64 MB chunk (an aligned request can need more than the chunk just freed).
    assert min(default["faults"][-4:]) > pages // 2  # mmap'd afresh every time
    assert max(kept["faults"][-4:]) < pages // 20  # the same heap memory, already mapped


@pytest.mark.skipif(GLIBC, reason="only where the C library is not glibc")
def test_other_c_libraries_are_left_alone():
    from moekit.runtime import keep_freed_memory

    assert keep_freed_memory() is False
