"""`lagnet train` killed (SIGKILL, SIGTERM) at each write of its first epoch, then resumed.

Every write goes through ``lagnet._io.atomic_write``, whose test-only hook
``LAGNET_TEST_KILL_AT=NAME:PHASE:SIGNAL`` makes the process signal itself before the temporary
file exists, during the write (the temporary file holds the data, not yet renamed) or after
the rename. An epoch writes ``last.pth`` then ``best.pth`` (nothing happens between the end of
one and the start of the other, so "after last.pth" is also "before best.pth"). Whatever the
moment, ``--resume`` must finish the run with the ``log.json`` and ``best.pth`` weights of an
uninterrupted run, SIGTERM must leave no temporary file, and a SIGKILLed run's lock is named
and taken over. The uninterrupted run shows progress bars, the others do not: the same
``log.json`` also shows that bars do not change results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lagnet.checkpoint import load_checkpoint
from lagnet.data import generate_synthetic_market
from lagnet.presets import SYNTHETIC_SIZES

pytestmark = pytest.mark.slow

KILLED = -9  # subprocess return code of a SIGKILLed process
TERMINATED = 143


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Run folders in memory when possible (checkpoints are written and fsynced many times)."""
    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() else 0
    with tempfile.TemporaryDirectory(dir=shm if room > 4 * 2**30 else None) as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def data_root(scratch: Path) -> Path:
    root = scratch / "data"
    generate_synthetic_market(root, seed=0, **SYNTHETIC_SIZES["tiny"])
    return root


def train(
    out: Path, data_root: Path, *extra: str, kill_at: str | None = None, bars: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LAGNET_TEST_KILL_AT", None)
    if kill_at is not None:
        env["LAGNET_TEST_KILL_AT"] = kill_at
    argv = [sys.executable, "-m", "lagnet", "train", "--preset", "tiny", "--epochs", "1",
            "--input-size", "32", "32", "--root", str(data_root), "--output", str(out),
            *([] if bars else ["--no-progress"]), *extra]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(scratch: Path, data_root: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    """log.json and best.pth weights of an uninterrupted run, with progress bars."""
    out = scratch / "reference"
    done = train(out, data_root, bars=True)
    assert done.returncode == 0, done.stderr
    assert "batch/s" in done.stderr  # the bars were shown
    log = (out / "log.json").read_bytes()
    best = load_checkpoint(out / "best.pth")["model"]
    shutil.rmtree(out)
    return log, best


def check_finished(
    out: Path,
    reference: tuple[bytes, dict[str, torch.Tensor]],
    resumed: subprocess.CompletedProcess[str],
) -> None:
    assert resumed.returncode == 0, resumed.stderr
    log, best = reference
    assert (out / "log.json").read_bytes() == log  # bit for bit, bars or not
    weights = load_checkpoint(out / "best.pth")["model"]
    assert list(weights) == list(best)
    assert all(torch.equal(weights[k], best[k]) for k in best)
    assert temporaries(out) == [] and (out / ".lock").read_bytes() == b""
    assert (out / "summary.json").is_file()


def test_kills_around_last_pth_then_resume(
    scratch: Path, data_root: Path, reference: tuple[bytes, dict[str, torch.Tensor]]
) -> None:
    """One folder killed five times in a row, each start resuming the previous one."""
    out = scratch / "chain"
    stale = "taking over the stale lock of pid "
    steps = [
        ("last.pth:before:KILL", KILLED, [], False),
        ("last.pth:before:TERM", TERMINATED, [], True),
        ("last.pth:during:KILL", KILLED, [".last.pth."], True),
        ("last.pth:during:TERM", TERMINATED, [], True),  # ...and the KILL's file is removed
        ("last.pth:after:KILL", KILLED, [], True),
    ]
    for n, (kill_at, code, left, resume) in enumerate(steps):
        run = train(out, data_root, *(["--resume"] if resume else []), kill_at=kill_at)
        assert run.returncode == code, (kill_at, run.stderr)
        assert [t[: len(p)] for t, p in zip(temporaries(out), left, strict=True)] == left
        names = {p.name for p in out.iterdir()} - {".lock", *temporaries(out)}
        expected = {"config.json", "last.pth"} if "after" in kill_at else {"config.json"}
        assert names == expected, kill_at
        if code == TERMINATED:
            assert run.stderr.splitlines()[-1] == (
                "lagnet: error: terminated (SIGTERM); files being written were left as they "
                "were before"
            )
        if n > 0:
            after_kill = steps[n - 1][1] == KILLED
            assert (stale in run.stdout) == after_kill, run.stdout
            assert "holds only config.json" in run.stdout
    resumed = train(out, data_root, "--resume")
    assert stale in resumed.stdout
    assert "wrote best.pth of epoch 1 (its write was interrupted)" in resumed.stdout
    check_finished(out, reference, resumed)
    shutil.rmtree(out)


@pytest.mark.parametrize(
    "kill_at",
    [
        "last.pth:after:TERM",
        "best.pth:during:KILL",
        "best.pth:during:TERM",
        "best.pth:after:KILL",
        "best.pth:after:TERM",
    ],
)
def test_kill_around_best_pth_then_resume(
    scratch: Path, data_root: Path, reference: tuple[bytes, dict[str, torch.Tensor]], kill_at: str
) -> None:
    out = scratch / kill_at.replace(":", "-")
    run = train(out, data_root, kill_at=kill_at)
    assert run.returncode == (KILLED if kill_at.endswith("KILL") else TERMINATED), run.stderr
    left = [name.startswith(".best.pth.") for name in temporaries(out)]
    assert left == ([True] if kill_at == "best.pth:during:KILL" else [])  # SIGTERM: none left
    assert (out / "last.pth").is_file()  # every kill after last.pth leaves the epoch resumable
    assert (out / "best.pth").is_file() == kill_at.startswith("best.pth:after")
    resumed = train(out, data_root, "--resume")
    assert "is finished: 1 of 1 epochs done" in resumed.stdout
    check_finished(out, reference, resumed)
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    shutil.rmtree(out)
