"""Several machines share a study through PostgreSQL: a real server on localhost, two workers on it.

CI installs Debian's `postgresql` and sets DRAGON_REQUIRE_POSTGRES=1, so there this test must run;
elsewhere it is skipped (with the reason) when no server can be started.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dragontrainer
from tests.study.test_search import FAST, epochs_logged

REQUIRED = os.environ.get("DRAGON_REQUIRE_POSTGRES") == "1"


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"DRAGON_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """initdb into a fresh folder and start a server on a free port (as the `postgres` user when root:
    the server refuses to run as root); stopped and removed afterwards."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the PostgreSQL driver is not installed (pip install 'dragontrainer[postgres]')")
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if not binaries[-1]:
        unavailable("no PostgreSQL server here (apt-get install postgresql)")
    bin_dir = Path(binaries[-1]).parent
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="dragon-pg-")
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            unavailable("running as root without runuser to start the server as another user")
        prefix = [runuser, "-u", "postgres", "--"]
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
    data, port = Path(root) / "data", free_port()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)

    try:
        done = run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "dragon")
        if done.returncode:
            unavailable(f"initdb failed: {done.stderr.strip()[-300:]}")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", f"{root}/log", "-w", "start")
        if done.returncode:
            unavailable(f"the PostgreSQL server did not start: {done.stderr.strip()[-300:]}")
        yield f"postgresql://dragon@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres_url: str, tmp_path: Path) -> None:
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 0.05, "high": 1.0}}, overrides=FAST, trials=4, workers=2, pruner="none",
        storage=postgres_url, out=tmp_path / "s",
    )  # fmt: skip
    assert [t["number"] for t in result.trials] == [0, 1, 2, 3]
    assert {t["state"] for t in result.trials} == {"COMPLETE"}
    for t in result.trials:
        assert epochs_logged(tmp_path / "s" / t["run_dir"]) == [1]
    assert not (tmp_path / "s" / "study.db").exists()  # the study lives in the server
