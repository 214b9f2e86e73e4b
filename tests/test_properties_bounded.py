"""Runs tests/bounded_properties.py in a subprocess under a memory limit (RLIMIT_AS) and a time limit:
a reader that trusted a declared size would die there with MemoryError instead of a clear line."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

LIMIT_BYTES = 3 * 2**30  # the interpreter with torch imported needs ~0.7 GiB of address space


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def test_every_reader_holds_its_bounds_under_a_memory_limit() -> None:
    tests = Path(__file__).parent / "bounded_properties.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tests.parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-x"],
        capture_output=True, text=True, env=env, preexec_fn=limit_memory, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
