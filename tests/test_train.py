"""``lagnet train`` in its tiny preset (the run, exact resume, NaN stop, DDP with the shared
image cache, refusals) and examples/train.py, the loop on the public API."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lagnet import LAGNetLoss, build_lagnet
from lagnet.checkpoint import load_checkpoint, save_checkpoint
from lagnet.cli.train import TrainingStopped, add_train_arguments, config_from_args, run_training
from lagnet.data import generate_synthetic_market
from lagnet.presets import SYNTHETIC_SIZES

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lagnet_example_train", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LagnetTrain:
    """``lagnet train ARGV`` in-process: ``main`` returns the run's summary."""

    @staticmethod
    def main(argv: list[str]) -> dict[str, Any]:
        parser = argparse.ArgumentParser()
        add_train_arguments(parser)
        args = parser.parse_args(argv)
        config = config_from_args(args)
        return run_training(config, resume=args.resume, overwrite=args.overwrite)


@pytest.fixture(scope="module")
def train() -> LagnetTrain:
    return LagnetTrain()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "tiny"


def tiny(output: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--output",
        str(output),
        "--root",
        str(data_root),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def two_epochs(
    train: LagnetTrain, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("run2")
    summary = train.main(tiny(out, data_root, "--epochs", "2"))
    return out, summary


def test_main_job_runs_end_to_end(two_epochs: tuple[Path, dict[str, Any]]) -> None:
    out, summary = two_epochs
    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    assert set(written) == {"histogram", "untrained", "trained"}
    for metrics in written.values():
        assert set(metrics) == {"mAP", "rank1", "rank5", "mINP"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2]
    assert {"loss", "cross_entropy", "triplet", "center", "lr", "mAP"} <= set(log[-1])
    assert (out / "last.pth").is_file() and (out / "best.pth").is_file()
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["state"]["epoch"] == 2
    model = build_lagnet(8, backbone="resnet18", num_attentions=4, weights=out / "best.pth")
    assert model.num_classes == 8


def test_resume_is_exact(
    train: LagnetTrain, data_root: Path, tmp_path: Path, two_epochs: tuple[Path, dict[str, Any]]
) -> None:
    full, _ = two_epochs
    out = tmp_path / "resumed"
    train.main(tiny(out, data_root, "--epochs", "1"))
    assert load_checkpoint(out / "last.pth")["state"]["epoch"] == 1
    train.main(tiny(out, data_root, "--epochs", "2", "--resume"))
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(out / "last.pth")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(
        a["criterion"]["center.centers"], b["criterion"]["center.centers"], rtol=0, atol=0
    )
    assert a["state"]["history"] == b["state"]["history"]
    assert (
        json.loads((full / "summary.json").read_text())["trained"]
        == json.loads((out / "summary.json").read_text())["trained"]
    )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    train: LagnetTrain, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "nan"
    train.main(tiny(out, data_root, "--epochs", "1"))
    good = load_checkpoint(out / "last.pth")
    original = LAGNetLoss.forward

    def broken(self: LAGNetLoss, output: Any, labels: torch.Tensor) -> Any:
        total, parts = original(self, output, labels)
        return total * float("nan"), parts

    monkeypatch.setattr(LAGNetLoss, "forward", broken)
    with pytest.raises(TrainingStopped) as info:
        train.main(tiny(out, data_root, "--epochs", "2", "--resume"))
    assert str(info.value) == (
        f"loss became nan at epoch 2, batch 1; stopping. The last good checkpoint is kept at "
        f"{out / 'last.pth'} (continue with --resume, maybe with a lower --lr)"
    )
    kept = load_checkpoint(out / "last.pth")
    assert kept["state"]["epoch"] == 1
    for key in good["model"]:
        assert torch.equal(kept["model"][key], good["model"][key])


def test_ddp_two_processes_on_cpu(data_root: Path, tmp_path: Path, two_epochs: Any) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29517", "-m", "lagnet", "train", *tiny(out, data_root, "--epochs", "1"),
    ]  # fmt: skip
    cache = tmp_path / "xdg"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 decoded the training split once into the user cache; rank 1 memory-mapped it
    (cached,) = (cache / "lagnet" / "images").iterdir()
    assert cached.name.startswith("images-64x32-n32-")
    assert cached.stat().st_size == 32 * 3 * 64 * 32
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["state"]["epoch"] == 1
    model = build_lagnet(8, backbone="resnet18", num_attentions=4, weights=out / "last.pth")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_sigkill_during_checkpoint_write_never_corrupts(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"step": torch.tensor(-1), "blob": torch.zeros(10)}, path)
    script = (
        "import sys, torch\n"
        "from lagnet.checkpoint import save_checkpoint\n"
        "blob = torch.randn(4_000_000)\n"
        "print('ready', flush=True)\n"
        "for i in range(10_000):\n"
        "    save_checkpoint({'step': torch.tensor(i), 'blob': blob + i}, sys.argv[1])\n"
    )
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(path)  # always a complete file
        step = int(ckpt["step"])
        if step >= 0:
            assert torch.equal(ckpt["blob"][:3], (ckpt["blob"] - step)[:3] + step)
            assert ckpt["blob"].numel() == 4_000_000
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ckpt.pth"]


def test_save_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint folder does not exist"):
        save_checkpoint({}, tmp_path / "missing" / "x.pth")
    bad = tmp_path / "truncated.pth"
    save_checkpoint({"a": torch.zeros(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match="refusing to load checkpoint"):
        load_checkpoint(bad)


def test_save_json_is_atomic_and_checked(tmp_path: Path) -> None:
    from lagnet.checkpoint import save_json

    path = save_json({"a": [1, 2.5]}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}
    with pytest.raises(TypeError):
        save_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        save_json({}, tmp_path / "no" / "x.json")


def test_rerun_without_resume_is_refused_and_changes_nothing(
    train: LagnetTrain, data_root: Path, two_epochs: tuple[Path, dict[str, Any]]
) -> None:
    from lagnet.runs import RunFolderError

    out, _ = two_epochs

    def files() -> dict[str, bytes]:  # the run folder holds a pretrained/ sub-folder
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(RunFolderError, match=r"already holds a run \(finished: 2 of 2 epochs"):
        train.main(tiny(out, data_root, "--epochs", "2"))
    with pytest.raises(RunFolderError, match=r"was started with other settings \(variant"):
        train.main(tiny(out, data_root, "--epochs", "3", "--resume", "--variant", "reference"))
    assert train.main(tiny(out, data_root, "--epochs", "1", "--resume")) == json.loads(
        before["summary.json"]
    )
    assert files() == before


def test_bad_arguments_fail_before_any_work(train: LagnetTrain, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^--eval-every must be >= 1, got 0$"):
        train.main(["--preset", "tiny", "--output", str(out), "--eval-every", "0"])
    with pytest.raises(SystemExit):  # argparse: not an int
        train.main(["--preset", "tiny", "--output", str(out), "--epochs", "two"])
    assert not out.exists()


def test_example_is_short_and_uses_the_public_api_only() -> None:
    source = TRAIN.read_text()
    assert len(source.splitlines()) <= 160
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    lagnet = {name for name in imported if name and name.startswith("lagnet")}
    assert lagnet == {"lagnet", "lagnet.data", "lagnet.engine", "lagnet.evaluation"}


def test_example_trains_with_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = generate_synthetic_market(tmp_path / "data", seed=0, **SYNTHETIC_SIZES["tiny"])
    weights = tmp_path / "weights.pth"
    results = load_example().main([
        "--dataset", "synthetic", "--root", str(root), "--epochs", "1", "--ids-per-batch", "2",
        "--images-per-id", "2", "--num-attentions", "4", "--warmup", "0", "--milestones",
        "--no-progress", "--output", str(weights),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "image cache: 32 images at 64x32, 192.0 KiB uint8 on cpu" in out
    assert list(results) == ["histogram", "untrained", "trained"]
    for metrics in results.values():
        assert list(metrics) == ["mAP", "rank1", "rank5", "mINP"]
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert out.splitlines()[-1].startswith(f"trained      {results['trained']['mAP']:7.3f}")
    model = build_lagnet(8, backbone="resnet18", num_attentions=4, weights=weights)
    assert model.num_classes == 8


def test_example_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    cases = [
        (["--epochs", "0"], "argument --epochs: must be a whole number >= 1, got '0'"),
        (["--dataset", "nope", "--root", str(tmp_path)], "unknown dataset 'nope'; choose one of"),
    ]
    for argv, expected in cases:
        cmd = [sys.executable, str(TRAIN), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"train.py: error: {expected}"), proc.stderr
        assert proc.stderr.count("\n") == 1
