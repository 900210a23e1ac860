"""The ``lagnet`` command and its run folders: every refusal, every end-to-end path.

The command runs in-process through ``lagnet.cli.main(argv)`` (which returns the exit status);
subprocesses are used only where the console script or the absence of a traceback is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lagnet.checkpoint import load_checkpoint, save_checkpoint
from lagnet.cli import main
from lagnet.model import build_lagnet
from lagnet.runs import RunFolder, RunFolderError, check_output_folder, resolve_device

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def one_error_line(err: str, expected: str) -> None:
    """stderr is exactly one ``lagnet: error:`` line starting with ``expected``."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lagnet: error: {expected}"), lines[0]
    assert "Traceback" not in err


def tiny(output: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "tiny", "--output", str(output), "--root", str(data_root),
        "--no-progress", *extra,
    ]  # fmt: skip


# --- arguments are checked before anything is written ----------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--ids-per-batch", "0"], "--ids-per-batch must be >= 1, got 0"),
        (["--images-per-id", "1"], "--images-per-id must be >= 2 (the triplet loss needs"),
        (["--lr", "0"], "--lr must be in (0, inf), got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--input-size", "0", "32"], "--input-size H must be >= 1, got 0"),
        (["--num-attentions", "-2"], "--num-attentions must be >= 1, got -2"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu, cuda, cuda:1"),
        (["--device", "cuda:99"], "--device cuda:99: "),
        (["--backbone", "vgg16"], "--backbone must be one of ('resnet18',"),
        (["--dataset", "viper"], "--dataset must be one of ("),
        (["--dataset", "folder"], "--dataset folder needs --pattern"),
        (["--pattern", r"(?P<pid>\d+)"], "--pattern is for --dataset folder only"),
        (["--backbone-weights", "missing.pth"], "--backbone-weights 'missing.pth': no such file"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ],
)
def test_bad_arguments_fail_at_once_and_write_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    data_root: Path,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *tiny(out, data_root, *extra))
    assert code == 2
    one_error_line(err, message)
    assert stdout == ""
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_root: Path
) -> None:
    code, _, err = run_cli(capsys, *tiny(tmp_path / "run", data_root, "--device", "cuda"))
    assert code == 2
    one_error_line(err, "--device cuda: CUDA is not available on this machine")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_fails_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_root: Path
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, *tiny(blocker / "run", data_root))
    assert code == 2
    one_error_line(err, f"--output {str(blocker / 'run')!r}: {str(blocker)!r} is a file")
    code, _, err = run_cli(capsys, *tiny(blocker, data_root))
    one_error_line(err, f"--output {str(blocker)!r} exists and is not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    assert blocker.read_text() == "x"


def test_read_only_output_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # root ignores chmod; fail the probe
    with pytest.raises(ValueError, match=r"is not writable: cannot create files in .*"):
        check_output_folder(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


def test_check_output_folder_leaves_nothing_behind(tmp_path: Path) -> None:
    assert check_output_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert list(tmp_path.iterdir()) == []


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TypeError, match=r"--device must be a string"):
        resolve_device(0)
    with pytest.raises(ValueError, match=r"unsupported device type 'meta'"):
        resolve_device("meta")


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "train", "--epochs", "1.5")
    assert code == 2
    one_error_line(
        err,
        "lagnet train: argument --epochs: invalid int value: '1.5' (see 'lagnet train --help')",
    )
    code, _, err = run_cli(capsys, "fly")
    assert code == 2
    one_error_line(err, "argument COMMAND: invalid choice: 'fly'")  # not "lagnet: " twice
    code, _, err = run_cli(capsys)
    assert code == 2
    one_error_line(err, "the following arguments are required: COMMAND")
    code, _, err = run_cli(capsys, "embed", "--weights", "w.pth")
    one_error_line(err, "lagnet embed: the following arguments are required: --images, --output")


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from lagnet import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert (code, out) == (0, f"lagnet {__version__}\n")
    for command in ("train", "evaluate", "export", "embed"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        assert f"usage: lagnet {command}" in out
        assert f"examples:\n  lagnet {command} " in out


# --- run folders -----------------------------------------------------------------------------


def fake_run(folder: Path, *, epoch: int, epochs: int, best: float, **config: Any) -> None:
    """A run folder as `lagnet train` leaves it (config, last.pth, best.pth, log.json)."""
    folder.mkdir(parents=True)
    cfg = {"epochs": epochs, "backbone": "resnet18", "variant": "paper", **config}
    state = {"epoch": epoch, "history": [], "best_mAP": best, "summary": {}}
    save_checkpoint({"config": cfg, "state": state, "w": torch.arange(3)}, folder / "last.pth")
    save_checkpoint({"config": cfg, "state": state, "w": torch.arange(3)}, folder / "best.pth")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "log.json").write_text("[]")


FIXED = ("backbone", "variant")


def test_run_folder_new_run_writes_only_on_create(tmp_path: Path) -> None:
    run = RunFolder.open(tmp_path / "r", {"epochs": 2}, fixed_keys=FIXED)
    assert (run.start_epoch, run.finished, run.checkpoint, run.notes) == (0, False, None, [])
    assert not (tmp_path / "r").exists()
    run.create()
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"epochs": 2}


def test_rerun_without_resume_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    fake_run(tmp_path / "r", epoch=2, epochs=2, best=0.57)
    before = snapshot(tmp_path / "r")
    with pytest.raises(
        RunFolderError,
        match=r"already holds a run \(finished: 2 of 2 epochs done\); pass --resume to continue "
        r"it, --overwrite to move its files aside",
    ):
        RunFolder.open(tmp_path / "r", {"epochs": 2}, fixed_keys=FIXED)
    assert snapshot(tmp_path / "r") == before


def test_non_empty_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"already holds files \(notes.txt\)"):
        RunFolder.open(tmp_path, {"epochs": 2})
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing", "empty", "no-last"])
def test_resume_without_checkpoint_is_an_error(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "r"
    if case != "missing":
        folder.mkdir()
    if case == "no-last":
        (folder / "log.json").write_text("[]")
    messages = {
        "missing": r"--resume: the run folder .* does not exist \(mistyped --output\?\)",
        "empty": r"--resume: no checkpoint .*last.pth' to resume from \(it is empty\)",
        "no-last": r"--resume: no checkpoint .* \(it holds log.json\); start a new run",
    }
    with pytest.raises(RunFolderError, match=messages[case]):
        RunFolder.open(folder, {"epochs": 2}, resume=True)
    assert folder.exists() == (case != "missing")
    if case == "no-last":
        assert snapshot(folder) == {"log.json": b"[]"}


def test_resume_with_other_fixed_settings_lists_them(tmp_path: Path) -> None:
    fake_run(tmp_path / "r", epoch=1, epochs=2, best=0.5)
    before = snapshot(tmp_path / "r")
    config = {"epochs": 2, "backbone": "resnet50", "variant": "reference"}
    with pytest.raises(
        RunFolderError,
        match=r"was started with other settings \(backbone: recorded \"resnet18\", now "
        r"\"resnet50\"; variant: recorded \"paper\", now \"reference\"\)",
    ):
        RunFolder.open(tmp_path / "r", config, resume=True, fixed_keys=FIXED)
    assert snapshot(tmp_path / "r") == before


def test_resume_changes_allowed_keys_and_says_so(tmp_path: Path) -> None:
    fake_run(tmp_path / "r", epoch=2, epochs=2, best=0.5, device="cpu", workers=0)
    config = {"epochs": 5, "backbone": "resnet18", "variant": "paper", "device": "cuda",
              "workers": 4}  # fmt: skip
    run = RunFolder.open(tmp_path / "r", config, resume=True, fixed_keys=FIXED)
    assert run.start_epoch == 2 and not run.finished
    assert run.notes == [
        f"resuming {str(tmp_path / 'r' / 'last.pth')!r} after epoch 2",
        "extending the run from 2 to 5 epochs (2 done)",
        'device changed: "cpu" -> "cuda"',
        "workers changed: 0 -> 4",
    ]


@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_of_a_finished_run_says_finished(tmp_path: Path, epochs: int) -> None:
    fake_run(tmp_path / "r", epoch=2, epochs=2, best=0.5)
    run = RunFolder.open(tmp_path / "r", {"epochs": epochs, **dict.fromkeys(FIXED)},
                         resume=True)  # fmt: skip
    assert run.finished
    assert run.notes == [
        f"the run in {str(tmp_path / 'r')!r} is finished: 2 of {epochs} epochs done, nothing "
        "to do (pass --epochs above 2 to train further)"
    ]
    with pytest.raises(RuntimeError, match="a finished run is not created again"):
        run.create()


def test_overwrite_moves_old_files_aside(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    fake_run(folder, epoch=2, epochs=2, best=0.57)
    before = snapshot(folder)
    run = RunFolder.open(folder, {"epochs": 3}, overwrite=True)
    assert snapshot(folder) == before  # open() alone changes nothing
    run.create()
    run.close()  # the lock (.lock) is held until close()
    (aside,) = [p for p in folder.iterdir() if p.name.startswith("previous-")]
    assert snapshot(aside) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", "config.json", aside.name])
    # a second --overwrite keeps the first moved-aside folder where it is
    (folder / "last.pth").write_bytes(b"new")
    RunFolder.open(folder, {"epochs": 3}, overwrite=True).create()
    assert len([p for p in folder.iterdir() if p.name.startswith("previous-")]) == 2
    assert snapshot(aside) == before


def test_overwrite_that_cannot_move_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "r"
    fake_run(folder, epoch=2, epochs=2, best=0.57)
    before = snapshot(folder)
    real_rename = os.rename
    calls = []

    def flaky(src: Any, dst: Any) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise OSError(16, "Device or resource busy")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    run = RunFolder.open(folder, {"epochs": 3}, overwrite=True)
    with pytest.raises(
        RunFolderError, match=r"cannot move the earlier files .* nothing was changed"
    ):
        run.create()
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_best_is_only_replaced_by_a_strictly_better_model(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    fake_run(folder, epoch=1, epochs=3, best=0.57)
    before = (folder / "best.pth").read_bytes()
    run = RunFolder.open(folder, {"epochs": 3, **dict.fromkeys(FIXED)}, resume=True)
    assert run.best_metric == 0.57
    assert run.save_best({"w": torch.zeros(1)}, 0.525) is False
    assert run.save_best({"w": torch.zeros(1)}, 0.57) is False  # a tie is not better
    assert (folder / "best.pth").read_bytes() == before
    assert run.save_best({"w": torch.ones(1)}, 0.6) is True
    assert torch.equal(load_checkpoint(folder / "best.pth")["w"], torch.ones(1))


def test_best_score_is_read_from_best_pth_when_newer_than_last(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    fake_run(folder, epoch=1, epochs=3, best=0.4)
    cfg = json.loads((folder / "config.json").read_text())
    state = {"epoch": 2, "history": [], "best_mAP": 0.7, "summary": {}}
    save_checkpoint({"config": cfg, "state": state}, folder / "best.pth")  # crash before last
    run = RunFolder.open(folder, {**cfg, "epochs": 3}, resume=True, fixed_keys=FIXED)
    assert run.best_metric == 0.7


def test_resume_of_a_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("r").mkdir()
    save_checkpoint({"model": {"w": torch.zeros(1)}}, tmp_path / "r" / "last.pth")
    with pytest.raises(RunFolderError, match=r"has no recorded configuration"):
        RunFolder.open(tmp_path / "r", {"epochs": 2}, resume=True)


# --- errors: one line for users, tracebacks for bugs ------------------------------------------


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import lagnet.cli.embed as embed

    def bug(args: Any) -> int:
        return int("not a number")  # a ValueError that lagnet's checks did not raise

    monkeypatch.setattr(embed, "run", bug)
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(["embed", "--weights", "w", "--images", "i", "--output", "o.npz"])


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--epochs must be >= 1, got -1"):
        main(["train", "--epochs", "-1", "--output", str(tmp_path / "r"), "--debug"])


def test_subprocess_user_error_has_no_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lagnet", "train", "--epochs", "-1", "--output",
           str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "lagnet: error: --epochs must be >= 1, got -1\n"
    proc = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: --epochs must be >= 1, got -1")
    assert not (tmp_path / "r").exists()


def test_console_script_is_installed() -> None:
    exe = shutil.which("lagnet")
    if exe is None:
        pytest.skip("the lagnet console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    from lagnet import __version__

    assert (proc.returncode, proc.stdout) == (0, f"lagnet {__version__}\n")


# --- evaluate, export, embed on the synthetic set ---------------------------------------------


def test_evaluate_prints_the_table_and_json(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path
) -> None:
    code, out, err = run_cli(
        capsys, "evaluate", "--weights", str(weights), "--dataset", "synthetic",
        "--root", str(data_root), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Synthetic (Market-1501 format): 16 queries, 20 gallery images"
    assert lines[1].split() == ["mAP", "rank-1", "rank-5", "rank-10", "mINP"]
    table = [float(v) for v in lines[2].split()]
    code, out, err = run_cli(
        capsys, "evaluate", "--weights", str(weights), "--dataset", "synthetic",
        "--root", str(data_root), "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert [round(report[k], 4) for k in ("mAP", "rank1", "rank5", "rank10", "mINP")] == table
    assert report["num_queries"] == 16 and report["num_gallery"] == 20
    assert report["num_valid_queries"] == 16 and report["missing_query_ids"] == []
    assert report["rerank"] is False and report["flip"] is True
    assert 0.0 < report["mAP"] <= 1.0


def test_evaluate_refuses_foreign_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_root: Path
) -> None:
    path = tmp_path / "plain.pth"
    save_checkpoint(build_lagnet(8, backbone="resnet18", num_attentions=4).state_dict(), path)
    code, _, err = run_cli(capsys, "evaluate", "--weights", str(path), "--dataset", "synthetic",
                           "--root", str(data_root))  # fmt: skip
    assert code == 2
    one_error_line(err, f"--weights {str(path)!r} is not a checkpoint of `lagnet train`")


def test_export_writes_onnx_and_refuses_to_overwrite(
    capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(capsys, "export", "--weights", str(weights), "--output", str(out))
    assert code == 0, err
    assert stdout == f"wrote {out} (input 64x32, ImageNet-normalised input)\n"
    import onnx

    graph = onnx.load(str(out)).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 64, 32]
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "export", "--weights", str(weights), "--output", str(out))
    assert code == 2
    one_error_line(err, f"--output {str(out)!r} exists; pass --overwrite to replace it")
    assert out.read_bytes() == before


def test_embed_writes_features_and_relative_paths(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path, tmp_path: Path
) -> None:
    images = tmp_path / "crops"
    (images / "cam2").mkdir(parents=True)
    query = sorted((data_root / "query").glob("*.jpg"))
    shutil.copy(query[0], images / "b.jpg")
    shutil.copy(query[1], images / "cam2" / "a.JPG")
    (images / "notes.txt").write_text("ignored")
    out = tmp_path / "features.npz"
    code, stdout, err = run_cli(
        capsys, "embed", "--weights", str(weights), "--images", str(images), "--output",
        str(out), "--batch-size", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert stdout == f"wrote {out}: 2 embeddings of size {512 * 7}\n"
    with np.load(out) as npz:
        assert sorted(npz.files) == ["features", "paths"]
        assert npz["paths"].tolist() == ["b.jpg", "cam2/a.JPG"]
        feats = npz["features"]
    assert feats.dtype == np.float32 and feats.shape == (2, 3584)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), [1.0, 1.0], rtol=1e-5)
    # the same image embeds to the same vector whatever the batch
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "embed", "--weights", str(weights), "--images", str(images),
                           "--output", str(out))  # fmt: skip
    assert code == 2
    one_error_line(err, f"--output {str(out)!r} exists; pass --overwrite to replace it")
    assert out.read_bytes() == before
    code, _, err = run_cli(
        capsys, "embed", "--weights", str(weights), "--images", str(images), "--output",
        str(out), "--overwrite", "--batch-size", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    with np.load(out) as npz:
        np.testing.assert_allclose(npz["features"], feats, rtol=1e-4, atol=1e-5)


def test_embed_input_errors(
    capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path
) -> None:
    images = tmp_path / "crops"
    images.mkdir()
    args = ["embed", "--weights", str(weights), "--images", str(images), "--output"]
    code, _, err = run_cli(capsys, *args, str(tmp_path / "f.npz"))
    assert code == 2
    one_error_line(err, f"--images {str(images)!r} holds no image files (.bmp, .jpeg")
    (images / "x.jpg").symlink_to(tmp_path / "gone.jpg")
    code, _, err = run_cli(capsys, *args, str(tmp_path / "f.npz"))
    one_error_line(err, f"{str(images / 'x.jpg')!r} is a link to a missing file")
    code, _, err = run_cli(capsys, *args, str(tmp_path / "no" / "f.npz"))
    one_error_line(err, f"--output {str(tmp_path / 'no' / 'f.npz')!r}: folder")
    code, _, err = run_cli(capsys, *args, str(tmp_path / "f.npz"), "--batch-size", "0")
    one_error_line(err, "--batch-size must be >= 1, got 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]


# --- lagnet train end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, bytes]]:
    """A finished 2-epoch tiny run through the command, and its files."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(tiny(out, data_root, "--epochs", "2")) == 0
    return out, snapshot(out)


def test_train_writes_a_complete_run_folder(finished_run: tuple[Path, dict[str, bytes]]) -> None:
    out, files = finished_run
    assert sorted(files) == sorted(
        [".lock", "best.pth", "config.json", "curves.png", "last.pth", "log.json",
         "summary.json", "pretrained/config.json", "pretrained/model.safetensors"]
    )  # fmt: skip
    config = json.loads(files["config.json"])
    assert {k: config[k] for k in ("preset", "epochs", "backbone", "variant", "P", "K")} == {
        "preset": "tiny", "epochs": 2, "backbone": "resnet18", "variant": "paper", "P": 2, "K": 2,
    }  # fmt: skip
    assert (config["amp"], config["compile"], config["device"]) == ("off", False, "cpu")
    summary = json.loads(files["summary.json"])
    assert set(summary) == {"histogram", "untrained", "trained"}
    last = load_checkpoint(out / "last.pth")
    assert last["state"]["epoch"] == 2 and last["config"] == config
    assert last["model_config"] == {
        "num_classes": 8, "backbone": "resnet18", "variant": "paper", "num_attentions": 4,
        "height": 64, "width": 32,
    }  # fmt: skip
    log = json.loads(files["log.json"])
    assert [e["epoch"] for e in log] == [1, 2]
    assert summary["trained"] == {k: log[-1][k] for k in ("mAP", "rank1", "rank5", "mINP")}
    assert files[".lock"] == b""  # released: no holder recorded
    # best.pth is the deployable model (no optimizer state): about a quarter of last.pth
    best = load_checkpoint(out / "best.pth")
    assert sorted(best) == ["config", "epoch", "lagnet_version", "metrics", "model",
                            "model_config"]  # fmt: skip
    best_entry = max(log, key=lambda e: e["mAP"])
    assert best["metrics"] == {k: best_entry[k] for k in ("mAP", "rank1", "rank5", "mINP")}
    assert best["epoch"] == best_entry["epoch"] and best["model_config"] == last["model_config"]
    assert 0.2 < len(files["best.pth"]) / len(files["last.pth"]) < 0.3
    # the pretrained folder of the best model: the weights of best.pth, its scores, its size
    shared = json.loads(files["pretrained/config.json"])
    assert shared["metrics"]["mAP"] == max(e["mAP"] for e in log)
    assert shared["input_size"] == [64, 32] and shared["model_args"]["num_classes"] == 8
    from lagnet import from_pretrained

    state = from_pretrained(out / "pretrained").state_dict()
    best_state = load_checkpoint(out / "best.pth")["model"]
    assert list(state) == list(best_state)
    assert all(torch.equal(state[k], best_state[k]) for k in state)


def test_rerun_into_a_finished_run_is_refused(
    capsys: pytest.CaptureFixture[str], finished_run: tuple[Path, dict[str, bytes]], data_root: Path
) -> None:
    out, files = finished_run
    code, stdout, err = run_cli(capsys, *tiny(out, data_root, "--epochs", "2"))
    assert (code, stdout) == (2, "")
    one_error_line(
        err,
        f"--output {str(out)!r} already holds a run (finished: 2 of 2 epochs done); pass "
        "--resume to continue it, --overwrite to move its files aside",
    )
    assert snapshot(out) == files


@pytest.mark.parametrize("epochs", ["1", "2"])
def test_resume_of_the_finished_run_writes_nothing(
    capsys: pytest.CaptureFixture[str],
    finished_run: tuple[Path, dict[str, bytes]],
    data_root: Path,
    epochs: str,
) -> None:
    out, files = finished_run
    code, stdout, err = run_cli(capsys, *tiny(out, data_root, "--resume", "--epochs", epochs))
    assert (code, err) == (0, "")
    assert stdout == (
        f"run folder: {out.absolute()}\n"
        f"the run in {str(out)!r} is finished: 2 of {epochs} epochs done, nothing to do "
        "(pass --epochs above 2 to train further)\n"
    )
    assert snapshot(out) == files


@pytest.mark.parametrize(
    ("extra", "listed"),
    [
        (["--backbone", "resnet34"], 'backbone: recorded "resnet18", now "resnet34"'),
        (["--variant", "reference"], 'variant: recorded "paper", now "reference"'),
        (["--images-per-id", "4", "--seed", "3"], "seed: recorded 0, now 3; K: recorded 2, now 4"),
    ],
)
def test_resume_with_other_settings_is_refused(
    capsys: pytest.CaptureFixture[str],
    finished_run: tuple[Path, dict[str, bytes]],
    data_root: Path,
    extra: list[str],
    listed: str,
) -> None:
    out, files = finished_run
    code, _, err = run_cli(capsys, *tiny(out, data_root, "--resume", "--epochs", "3", *extra))
    assert code == 2
    one_error_line(
        err, f"--resume: the run in {str(out)!r} was started with other settings ({listed})"
    )
    assert snapshot(out) == files


def test_resume_into_a_mistyped_output_creates_nothing(
    capsys: pytest.CaptureFixture[str], finished_run: tuple[Path, dict[str, bytes]], data_root: Path
) -> None:
    out, _ = finished_run
    typo = out.parent / "rnu"
    code, _, err = run_cli(capsys, *tiny(typo, data_root, "--resume"))
    assert code == 2
    one_error_line(err, f"--resume: the run folder {str(typo)!r} does not exist (mistyped")
    assert not typo.exists()


def test_extend_overwrite_and_best_only_if_better(
    capsys: pytest.CaptureFixture[str],
    finished_run: tuple[Path, dict[str, bytes]],
    data_root: Path,
    tmp_path: Path,
) -> None:
    source, files = finished_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    code, stdout, err = run_cli(capsys, *tiny(out, data_root, "--resume", "--epochs", "3"))
    assert code == 0, err
    assert stdout.startswith(
        f"run folder: {out.absolute()}\n"
        f"resuming {str(out / 'last.pth')!r} after epoch 2\n"
        "extending the run from 2 to 3 epochs (2 done)\n"
    )
    assert "trained 1 epochs in" in stdout
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2, 3]
    old_best = max(e["mAP"] for e in log[:2])
    replaced = (out / "best.pth").read_bytes() != files["best.pth"]
    assert replaced == (log[2]["mAP"] > old_best)
    assert load_checkpoint(out / "best.pth")["metrics"]["mAP"] == max(e["mAP"] for e in log)
    assert json.loads((out / "config.json").read_text())["epochs"] == 3

    before = snapshot(out)
    del before[".lock"]  # the folder's lock stays where it is
    code, stdout, err = run_cli(capsys, *tiny(out, data_root, "--epochs", "1", "--overwrite"))
    assert code == 0, err
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert snapshot(aside) == before
    assert json.loads((out / "log.json").read_text())[0]["epoch"] == 1
    assert load_checkpoint(out / "last.pth")["state"]["epoch"] == 1


def test_non_finite_loss_exits_1_and_keeps_the_last_good_checkpoint(
    capsys: pytest.CaptureFixture[str],
    finished_run: tuple[Path, dict[str, bytes]],
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lagnet.losses import LAGNetLoss

    source, files = finished_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    original = LAGNetLoss.forward

    def broken(self: LAGNetLoss, output: Any, labels: torch.Tensor) -> Any:
        total, parts = original(self, output, labels)
        return total * float("nan"), parts

    monkeypatch.setattr(LAGNetLoss, "forward", broken)
    code, _, err = run_cli(capsys, *tiny(out, data_root, "--resume", "--epochs", "3"))
    assert code == 1
    lines = err.splitlines()
    assert lines == [
        f"lagnet: error: loss became nan at epoch 3, batch 1; stopping. The last good "
        f"checkpoint is kept at {out / 'last.pth'} (continue with --resume, maybe with a "
        "lower --lr)"
    ]
    for name in ("last.pth", "best.pth", "log.json", "summary.json"):
        assert (out / name).read_bytes() == files[name], name


# --- custom data: --dataset folder with a regex -----------------------------------------------


def make_custom(data_root: Path, target: Path) -> None:
    """The tiny synthetic set as ``person<pid>-cam<camid>-<n>.jpg`` in train/query/gallery."""
    split_dirs = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, source in split_dirs.items():
        (target / split).mkdir(parents=True)
        for n, image in enumerate(sorted((data_root / source).glob("*.jpg"))):
            pid, cam = image.name.split("_")[:2]
            if pid == "-1":
                continue
            shutil.copy(image, target / split / f"person{pid}-cam{cam[1]}-{n}.jpg")


PATTERN = r"person(?P<pid>\d+)-cam(?P<camid>\d+)-\d+\.jpg"


def test_custom_folder_dataset_trains_and_evaluates(
    capsys: pytest.CaptureFixture[str], data_root: Path, tmp_path: Path
) -> None:
    crops = tmp_path / "crops"
    make_custom(data_root, crops)
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "folder", "--root", str(crops),
            "--pattern", PATTERN, "--output", str(out), "--epochs", "1",
            "--no-progress"]  # fmt: skip
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"folder {str(crops)!r} dataset" in stdout
    assert "histogram" not in stdout  # the baselines are the synthetic demo's
    assert json.loads((out / "config.json").read_text())["pattern"] == PATTERN
    # one query identity loses its gallery images: named in a warning, the rest is scored
    query_pids = sorted({int(p.name[6:10]) for p in (crops / "query").iterdir()})
    gone = query_pids[0]
    for image in (crops / "gallery").glob(f"person{gone:04d}-*"):
        image.unlink()
    code, stdout, err = run_cli(
        capsys, "evaluate", "--weights", str(out / "best.pth"), "--dataset", "folder",
        "--root", str(crops), "--pattern", PATTERN, "--json",
    )  # fmt: skip
    assert code == 0, err
    warning, *caches = err.splitlines()
    assert warning == (
        f"lagnet: warning: folder {str(crops)!r}: 1 of {len(query_pids)} query identities have "
        f"no gallery image from another camera and are left out of the scores: {gone}"
    )
    assert len(caches) == 2 and all(c.startswith("image cache: ") for c in caches)  # stderr
    report = json.loads(stdout)
    assert report["missing_query_ids"] == [gone]
    assert report["num_valid_queries"] == report["num_queries"] - 2  # its two camera views


def test_custom_folder_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], data_root: Path, tmp_path: Path
) -> None:
    crops = tmp_path / "crops"
    make_custom(data_root, crops)
    base = ["train", "--preset", "tiny", "--dataset", "folder", "--root", str(crops),
            "--output", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    code, _, err = run_cli(capsys, *base, "--pattern", r"person(?P<pid>\d+)-.*\.jpg")
    assert code == 2
    one_error_line(err, r"--pattern 'person(?P<pid>\\d+)-.*\\.jpg' lacks the named group(s) camid")
    (crops / "query" / "IMG_0001.jpg").write_bytes(
        (crops / "train").iterdir().__next__().read_bytes()
    )
    code, _, err = run_cli(capsys, *base, "--pattern", PATTERN)
    assert code == 2
    one_error_line(err, f"folder {str(crops)!r}: 1 file names in the query split")
    assert "'IMG_0001.jpg'" in err
    for image in (crops / "gallery").iterdir():
        image.unlink()
    (crops / "query" / "IMG_0001.jpg").unlink()
    code, _, err = run_cli(capsys, *base, "--pattern", PATTERN)
    one_error_line(err, f"folder {str(crops)!r}: the gallery split ")
    assert "has no images" in err
    assert not (tmp_path / "run").exists()


def test_engine_flags_and_their_defaults() -> None:
    import argparse

    from lagnet.cli.train import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = config_from_args(parser.parse_args(["--preset", "tiny"]))
    assert (config.amp, config.amp_mode, config.compile, config.channels_last) == (
        "off", None, False, False,
    )  # fmt: skip
    flags = ["--preset", "tiny", "--amp", "bf16", "--compile", "--channels-last"]
    config = config_from_args(parser.parse_args(flags))
    assert (config.amp, config.amp_mode, config.compile, config.channels_last) == (
        "bf16", "bf16", True, True,
    )  # fmt: skip
    assert config_from_args(parser.parse_args(["--preset", "tiny", "--amp", "off"])).amp == "off"


# --- lagnet index / lagnet search ------------------------------------------------------------


def write_embeddings(path: Path, features: np.ndarray, names: list[str]) -> None:
    np.savez(path, features=features.astype(np.float32), paths=np.array(names))


def test_index_and_search_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1).numpy()
    names = [f"cam{i % 3}/img{i:02d}.jpg" for i in range(40)]
    write_embeddings(tmp_path / "gallery.npz", gallery, names)
    write_embeddings(tmp_path / "queries.npz", gallery[[7, 31]], ["q7.jpg", "q31.jpg"])
    index = tmp_path / "gallery.lagidx"
    code, out, err = run_cli(capsys, "index", "--features", str(tmp_path / "gallery.npz"),
                             "--output", str(index), "--kind", "flat")  # fmt: skip
    assert code == 0, err
    assert out == (f"wrote {index} (flat, 40 items of size 16) and {index}.paths.txt\n")
    assert (tmp_path / "gallery.lagidx.paths.txt").read_text().splitlines() == names
    code, out, err = run_cli(capsys, "search", "--index", str(index), "--queries",
                             str(tmp_path / "queries.npz"), "--k", "3", "--json")  # fmt: skip
    assert code == 0, err
    results = json.loads(out)
    assert [r["query"] for r in results] == ["q7.jpg", "q31.jpg"]
    assert [r["results"][0]["path"] for r in results] == [names[7], names[31]]
    assert all(len(r["results"]) == 3 for r in results)
    assert results[0]["results"][0]["distance"] == pytest.approx(0.0, abs=1e-5)
    # the same ranking as exact cosine search
    expected = np.argsort(-(gallery[[7, 31]] @ gallery.T), axis=1, kind="stable")[:, :3]
    assert [[h["path"] for h in r["results"]] for r in results] == [
        [names[i] for i in row] for row in expected
    ]
    code, out, _ = run_cli(capsys, "search", "--index", str(index), "--queries",
                           str(tmp_path / "queries.npz"), "--k", "1")  # fmt: skip
    assert code == 0
    assert out.splitlines()[:2] == ["q7.jpg", f"    1  {0.0:.4f}  {names[7]}"]


def test_index_and_search_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    feats = np.eye(4, 8, dtype=np.float32)
    write_embeddings(tmp_path / "g.npz", feats, ["a", "b", "c", "d"])
    index = tmp_path / "g.lagidx"
    assert main(["index", "--features", str(tmp_path / "g.npz"), "--output", str(index)]) == 0
    capsys.readouterr()
    before = index.read_bytes()
    code, _, err = run_cli(capsys, "index", "--features", str(tmp_path / "g.npz"),
                           "--output", str(index))  # fmt: skip
    assert code == 2
    one_error_line(err, f"{str(index)!r} exists; pass --overwrite to replace it")
    assert index.read_bytes() == before
    np.savez(tmp_path / "bad.npz", feats=feats)
    code, _, err = run_cli(capsys, "index", "--features", str(tmp_path / "bad.npz"),
                           "--output", str(tmp_path / "x.lagidx"))  # fmt: skip
    one_error_line(
        err,
        f"--features {str(tmp_path / 'bad.npz')!r} has no features or paths array (it holds "
        "feats); write it with lagnet embed",
    )
    write_embeddings(tmp_path / "q.npz", np.ones((1, 5)), ["q"])
    code, _, err = run_cli(capsys, "search", "--index", str(index), "--queries",
                           str(tmp_path / "q.npz"))  # fmt: skip
    assert code == 2
    assert (
        err.startswith("lagnet: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    )
    assert "8" in err and "5" in err  # the index's size and the queries' size
    (tmp_path / "g.lagidx.paths.txt").unlink()
    code, _, err = run_cli(capsys, "search", "--index", str(index), "--queries",
                           str(tmp_path / "g.npz"))  # fmt: skip
    one_error_line(err, f"--index {str(index)!r}: its list of paths")
    assert not (tmp_path / "x.lagidx").exists()


def test_multi_line_errors_become_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           weights: Path) -> None:  # fmt: skip
    code, _, err = run_cli(capsys, "evaluate", "--weights", str(weights), "--dataset",
                           "market1501", "--root", str(tmp_path))  # fmt: skip
    assert code == 2
    one_error_line(err, f"Market-1501: {str(tmp_path)!r} is missing 'bounding_box_train'")
    assert "Expected layout: <root>/ (or <root>/Market-1501-v15.09.15/, as unzipped)" in err


def test_no_scorable_query_is_an_error_naming_the_ids() -> None:
    from types import SimpleNamespace

    from lagnet.cli._common import describe_missing
    from lagnet.data import ReIDRecord

    query = [ReIDRecord("q1", 1, 0), ReIDRecord("q2", 2, 0)]
    gallery = [ReIDRecord("g1", 1, 0), ReIDRecord("g3", 3, 1)]  # id 1 only in the same camera
    data: Any = SimpleNamespace(name="toy", query=query, gallery=gallery)
    with pytest.raises(
        ValueError,
        match=r"^toy: none of the 2 query identities has a gallery image from another camera "
        r"\(1, 2\), so nothing can be evaluated",
    ):
        describe_missing(data)
    data.gallery.append(ReIDRecord("g2", 2, 1))
    assert describe_missing(data) == (
        "toy: 1 of 2 query identities have no gallery image from another camera and are left "
        "out of the scores: 1"
    )
    data.gallery.append(ReIDRecord("g1b", 1, 2))
    assert describe_missing(data) is None


def test_evaluate_with_rerank(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path
) -> None:
    code, out, err = run_cli(
        capsys, "evaluate", "--weights", str(weights), "--dataset", "synthetic",
        "--root", str(data_root), "--json", "--rerank", "--no-flip",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert (report["rerank"], report["flip"]) == (True, False)
    assert 0.0 < report["mAP"] <= 1.0 and report["num_valid_queries"] == 16


def test_user_error_classifies_by_origin() -> None:
    from lagnet.cli import user_error
    from lagnet.runs import resolve_device

    try:
        resolve_device("cuda:x")
    except ValueError as err:
        assert user_error(err) == "--device 'cuda:x' is not a device; use cpu, cuda, cuda:1, ..."
    try:
        torch.zeros(2).view(3)
    except RuntimeError as err:
        assert user_error(err) is None  # not a user-error type
    try:
        int("x")
    except ValueError as err:
        assert user_error(err) is None  # raised outside lagnet: a bug
    try:
        import lagnet.no_such_module  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as err:
        assert user_error(err) is None  # lagnet itself broken, not a missing extra
