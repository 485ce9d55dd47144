"""The model's process keeps the memory its steps free (engine/allocator.py), unless the operator chose."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from entity_llm_server.engine.allocator import operator_choice

# A block past glibc's largest automatic mmap threshold (32 MiB), allocated, touched and freed
# five times after a first round: the minor page faults of those five rounds, and what
# keep_freed_memory() said (when asked to run it).
REUSE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
said = ""
if sys.argv[1] == "keep":
    from entity_llm_server.engine.allocator import keep_freed_memory
    said = keep_freed_memory()
SIZE = 48 << 20
def round():
    block = libc.malloc(SIZE)
    libc.memset(block, 1, SIZE)
    libc.free(block)
round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, said, sep="|")
"""

PAGES = 5 * (48 << 20) // os.sysconf("SC_PAGE_SIZE")
GLIBC = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc, whose malloc is what is tuned")


def _reuse(mode: str, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if operator_choice({k: v}) is None}
    out = subprocess.run(
        [sys.executable, "-c", REUSE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    faults, said = out.stdout.strip().split("|")
    return int(faults), said


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned; this C library is not it"
)
def test_freed_blocks_stay_in_the_process_once_kept():
    faults, _ = _reuse("default")
    # By default each round maps the block afresh: a fault for (nearly) every page it touches.
    assert faults > PAGES // 2, faults
    faults, said = _reuse("keep")
    assert said == "freed memory kept (mmap and trim thresholds set)"
    # Kept: the rounds reuse the first one's pages.
    assert faults < PAGES // 20, faults


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned; this C library is not it"
)
def test_an_operators_choice_is_left_alone():
    faults, said = _reuse("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert said == "left alone: MALLOC_TRIM_THRESHOLD_ is set"
    assert faults > PAGES // 2, faults


@pytest.mark.parametrize(
    ("environ", "chosen"),
    [
        ({}, None),
        ({"MALLOC_MMAP_THRESHOLD_": "1"}, "MALLOC_MMAP_THRESHOLD_"),
        ({"MALLOC_TRIM_THRESHOLD_": "1"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES"),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, None),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
        ({"LD_PRELOAD": "/opt/lib/libtcmalloc_minimal.so"}, "LD_PRELOAD"),
        ({"LD_PRELOAD": "/opt/lib/libfaketime.so"}, None),
    ],
)
def test_what_counts_as_the_operators_choice(environ, chosen):
    assert operator_choice(environ) == chosen
