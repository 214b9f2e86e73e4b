"""The allocator set-up: real mallopt calls on glibc, a silent no-op wherever it does not apply."""

from __future__ import annotations

import ctypes
import sys

import pytest

from dragontrainer.train import allocator
from dragontrainer.train.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, configure_allocator


class FakeLibc:
    """A libc stand-in recording mallopt calls (or lacking it, like musl or macOS)."""

    def __init__(self, *, mallopt: bool = True, glibc: bool = True, accepts: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        if mallopt:
            self.mallopt = self._mallopt
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"
        self.accepts = accepts

    def _mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.accepts


@pytest.fixture(autouse=True)
def _no_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (allocator.OPT_OUT, *allocator.USER_SETTINGS):
        monkeypatch.delenv(name, raising=False)


def test_glibc_gets_both_thresholds() -> None:
    libc = FakeLibc()
    assert configure_allocator(libc)  # type: ignore[arg-type]
    assert libc.calls == [(M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD), (M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]
    assert allocator.TRIM_THRESHOLD < 2**31  # mallopt takes a C int


@pytest.mark.parametrize("libc", [FakeLibc(mallopt=False), FakeLibc(glibc=False), FakeLibc(accepts=0)])
def test_a_libc_without_mallopt_or_refusing_it_is_a_no_op(libc: FakeLibc) -> None:
    assert configure_allocator(libc) is False  # type: ignore[arg-type]


def test_the_users_own_settings_and_the_opt_out_win(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("MALLOC_MMAP_THRESHOLD_", "1048576"), (allocator.OPT_OUT, "system")]:
        with monkeypatch.context() as patched:
            patched.setenv(name, value)
            libc = FakeLibc()
            assert configure_allocator(libc) is False  # type: ignore[arg-type]
            assert libc.calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_real_process_allocator_accepts_it() -> None:
    libc = ctypes.CDLL(None)
    if getattr(libc, "gnu_get_libc_version", None) is None:
        pytest.skip("not glibc")
    assert configure_allocator(libc)
    assert configure_allocator() in (True, False)  # the once-per-process call never raises
