"""configure_determinism leaves the compiler stack unimported when determinism stays off."""

from __future__ import annotations

import subprocess
import sys

import torch

from dragontrainer.train.device import configure_determinism

PROBE = """
import sys, torch
from dragontrainer.train.device import configure_determinism
configure_determinism(False, torch.device("cpu"))
print(sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
"""


def test_determinism_off_does_not_import_the_compiler_stack() -> None:
    # a fresh interpreter: this one has long imported torch._dynamo (torch.optim does)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_determinism_is_switched_both_ways() -> None:
    try:
        configure_determinism(True, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        configure_determinism(False, torch.device("cpu"))  # a later run in the same process turns it off
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
