"""Run folders (issue 16): lock, stale temporaries, config-only folders, the deployable best.pth,
resumes that keep the recorded settings, early argument checks, display that never changes
results. The kills of a real `lagnet train` are in test_run_kill.py."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lagnet._io import Terminated, atomic_write, remove_stale_temporaries, terminate_on_sigterm
from lagnet._progress import progress
from lagnet.checkpoint import load_checkpoint, save_checkpoint
from lagnet.cli import build_parser, main
from lagnet.cli.train import epoch_timing
from lagnet.cli.train_config import config_from_args
from lagnet.model import MIN_INPUT_SIZE, LAGNet, build_lagnet
from lagnet.runs import RunFolder, RunFolderError, deployable_checkpoint


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))}


def one_error_line(err: str, expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lagnet: error: {expected}"), lines[0]


def fake_run(folder: Path, *, epoch: int, epochs: int, **config: Any) -> dict[str, Any]:
    """A run folder as `lagnet train` leaves it after ``epoch`` epochs (last.pth, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"epochs": epochs, "backbone": "resnet18", "milestones": [], **config}
    history = [{"epoch": e + 1, "lr": 1e-3, "loss": 1.0 / (e + 1)} for e in range(epoch)]
    state = {"epoch": epoch, "history": history, "best_mAP": -1.0, "summary": {}}
    ckpt = {"config": cfg, "state": state, "model": {"w": torch.arange(3.0)}, "optimizer": {}}
    save_checkpoint(ckpt, folder / "last.pth")
    (folder / "config.json").write_text(json.dumps(cfg))
    return ckpt


# --- display never changes results -----------------------------------------------------------


class Counted:
    """An iterable that counts how often it is iterated."""

    def __init__(self) -> None:
        self.iterations = 0

    def __iter__(self) -> Iterator[int]:
        self.iterations += 1
        yield from range(3)

    def __len__(self) -> int:
        return 3


def test_a_progress_bar_iterates_once_and_draws_no_random_number() -> None:
    pytest.importorskip("tqdm")
    states = []
    for enabled in (False, True):
        torch.manual_seed(0)
        loader = DataLoader(list(range(10)), batch_size=4)  # each iterator draws a base seed
        assert [b.tolist() for b in progress(loader, enabled, leave=False)] == [
            [0, 1, 2, 3], [4, 5, 6, 7], [8, 9],
        ]  # fmt: skip
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])  # tqdm.auto used to iterate the loader twice
    counted = Counted()
    bar = progress(counted, True, leave=False)
    assert counted.iterations == 0  # lazy: nothing happens before the caller iterates
    assert list(bar) == [0, 1, 2] and counted.iterations == 1


# --- SIGTERM and temporary files -------------------------------------------------------------


def test_sigterm_mid_write_removes_the_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pth"
    target.write_bytes(b"previous")

    def write(f: Any) -> None:
        f.write(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated), terminate_on_sigterm():
        atomic_write(target, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert target.read_bytes() == b"previous"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_stale_temporaries_of_its_own_pattern_only(tmp_path: Path) -> None:
    for name in (".last.pth.ab_cd12z.tmp", ".best.pth.x1y2z3w4.tmp", "notes.tmp", ".a.b.tmp"):
        (tmp_path / name).write_bytes(b"1234")
    assert remove_stale_temporaries(tmp_path) == [
        (".best.pth.x1y2z3w4.tmp", 4), (".last.pth.ab_cd12z.tmp", 4),
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.b.tmp", "notes.tmp"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path: Path) -> None:
    # mkstemp makes 0600 files: a shared model or checkpoint would be unreadable by others
    previous = os.umask(0o027)
    try:
        written = atomic_write(tmp_path / "model.safetensors", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o640


def test_a_start_removes_stale_temporaries_and_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    fake_run(folder, epoch=1, epochs=2)
    (folder / ".last.pth.k2j4h5g6.tmp").write_bytes(b"x" * 2048)
    run = RunFolder.open(folder, {"epochs": 2, "backbone": "resnet18"}, resume=True)
    assert run.lock() == [
        "removed 1 temporary file(s) left by an interrupted write: .last.pth.k2j4h5g6.tmp "
        "(2048 bytes)"
    ]
    run.close()
    assert not (folder / ".last.pth.k2j4h5g6.tmp").exists()


# --- a folder holding only config.json ------------------------------------------------------


@pytest.mark.parametrize("resume", [True, False])
def test_a_config_only_folder_starts_afresh(tmp_path: Path, resume: bool) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "config.json").write_text('{"epochs": 1}')
    (folder / ".last.pth.abcdefgh.tmp").write_bytes(b"partial")  # the kill's leftover
    run = RunFolder.open(folder, {"epochs": 2}, resume=resume)
    assert (run.checkpoint, run.start_epoch) == (None, 0)
    assert run.notes == [
        f"{str(folder)!r} holds only config.json (a start that stopped before its first "
        "epoch ended, no trained state): starting the run afresh"
    ]
    run.create()
    run.close()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "config.json"]
    assert json.loads((folder / "config.json").read_text()) == {"epochs": 2}


# --- the lock ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    first = RunFolder.open(folder, {"epochs": 2})
    first.create()
    holder = json.loads((folder / ".lock").read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    second = RunFolder.open(folder, {"epochs": 2}, overwrite=True)
    with pytest.raises(
        RunFolderError,
        match=rf"--output '{folder}' is in use by another training \(pid {os.getpid()} on host "
        rf"{socket.gethostname()}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC; lock file "
        r"\.lock\); wait for it to end, or choose another --output",
    ):
        second.lock()
    first.close()
    assert (folder / ".lock").read_bytes() == b""  # released
    assert second.lock() == []
    second.close()


def test_a_stale_lock_of_a_dead_process_is_named_and_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    fake_run(folder, epoch=1, epochs=2)
    dead = {"pid": 999_999_999, "host": socket.gethostname(), "started": 0.0}
    (folder / ".lock").write_text(json.dumps(dead))  # left by a SIGKILLed training
    run = RunFolder.open(folder, {"epochs": 2, "backbone": "resnet18"}, resume=True)
    assert run.lock() == [
        f"taking over the stale lock of pid 999999999 on host {socket.gethostname()}, started "
        "1970-01-01 00:00:00 UTC: that process ended without releasing it (killed?)"
    ]
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    run.close()


def test_the_cli_refuses_a_second_training_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "r"
    recorded = config_from_args(parse("--preset", "tiny", "--output", str(folder))).to_dict()
    fake_run(folder, epoch=1, **recorded)
    holder = RunFolder(folder, {})  # another training, holding the lock
    holder.lock()
    try:
        before = snapshot(folder)
        code = main(["train", "--preset", "tiny", "--output", str(folder), "--resume"])
        _, err = capsys.readouterr()
        after = snapshot(folder)
    finally:
        holder.close()
    assert code == 2
    one_error_line(err, f"--output {str(folder)!r} is in use by another training (pid ")
    assert after == before


# --- best.pth: the deployable model ----------------------------------------------------------


def test_best_pth_is_the_model_and_old_full_files_still_load(tmp_path: Path) -> None:
    from lagnet.cli._common import load_run_model

    torch.manual_seed(0)
    model = LAGNet(8, backbone="resnet18", num_attentions=4)
    full = {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "rng_cpu": torch.get_rng_state(),
        "state": {"epoch": 3, "history": [], "best_mAP": 0.5, "summary": {}},
        "config": {"epochs": 3},
        "model_config": {"num_classes": 8, "backbone": "resnet18", "variant": "paper",
                         "num_attentions": 4, "height": 64, "width": 32},
        "lagnet_version": "0.1.0",
    }  # fmt: skip
    best = deployable_checkpoint(full, metrics={"mAP": 0.5, "rank1": 0.75}, epoch=3)
    assert sorted(best) == ["config", "epoch", "lagnet_version", "metrics", "model",
                            "model_config"]  # fmt: skip
    save_checkpoint(best, tmp_path / "best.pth")
    save_checkpoint(full, tmp_path / "old_best.pth")  # the format of lagnet before issue 16
    for name in ("best.pth", "old_best.pth"):
        rebuilt = build_lagnet(weights=tmp_path / name)
        loaded, meta = load_run_model(tmp_path / name)
        for m in (rebuilt, loaded):
            state = m.state_dict()
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert (meta["height"], meta["width"]) == (64, 32)
    assert load_checkpoint(tmp_path / "best.pth")["metrics"] == {"mAP": 0.5, "rank1": 0.75}
    # a resume reads the score of either form
    for name, folder in (("best.pth", "new"), ("old_best.pth", "old")):
        fake_run(tmp_path / folder, epoch=3, epochs=4)
        os.replace(tmp_path / name, tmp_path / folder / "best.pth")
        run = RunFolder.open(tmp_path / folder, {"epochs": 4, "backbone": "resnet18"},
                             resume=True)  # fmt: skip
        assert run.best_metric == 0.5


def test_a_finished_resume_completes_a_best_pth_cut_short(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    ckpt = fake_run(folder, epoch=1, epochs=1)
    entry = {"epoch": 1, "lr": 1e-3, "loss": 1.0, "mAP": 0.25, "rank1": 0.5}
    ckpt["state"].update(history=[entry], best_mAP=0.25, best_epoch=1)
    ckpt["model_config"] = {"num_classes": 8}
    save_checkpoint(ckpt, folder / "last.pth")  # killed before best.pth and log.json
    run = RunFolder.open(folder, {"epochs": 1, "backbone": "resnet18"}, resume=True)
    assert run.finished
    assert run.complete() == [
        "wrote best.pth of epoch 1 (its write was interrupted)",
        "wrote log.json up to epoch 1 (its write was interrupted)",
    ]
    best = load_checkpoint(folder / "best.pth")
    assert (best["epoch"], best["metrics"]) == (1, {"mAP": 0.25, "rank1": 0.5})
    assert torch.equal(best["model"]["w"], torch.arange(3.0)) and "optimizer" not in best
    assert json.loads((folder / "log.json").read_text()) == [entry]
    again = RunFolder.open(folder, {"epochs": 1, "backbone": "resnet18"}, resume=True)
    assert again.complete() == []  # nothing left to complete


# --- --resume keeps the recorded settings; extending, shortening ----------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["train", *argv])


def test_a_bare_resume_takes_the_recorded_settings(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    first = config_from_args(
        parse("--preset", "tiny", "--output", str(folder), "--epochs", "10", "--seed", "3",
              "--lr", "0.01", "--input-size", "32", "32")
    )  # fmt: skip
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(first.to_dict()))
    again = config_from_args(parse("--output", str(folder), "--resume"))  # no --preset either
    assert again == first  # not the preset's 2 epochs, seed 0, lr 1e-3, 64x32
    longer = config_from_args(parse("--output", str(folder), "--resume", "--epochs", "12"))
    assert (longer.epochs, longer.seed, longer.lr) == (12, 3, 0.01)
    bars = config_from_args(parse("--output", str(folder), "--resume", "--no-progress"))
    assert bars.progress is False and config_from_args(parse("--output", str(folder),
                                                             "--resume")).progress  # fmt: skip


def test_shortening_says_so_and_warns_of_lost_milestones(tmp_path: Path) -> None:
    fake_run(tmp_path / "r", epoch=5, epochs=20, milestones=[8, 15])
    config = {"epochs": 12, "backbone": "resnet18", "milestones": [8, 15]}
    run = RunFolder.open(tmp_path / "r", config, resume=True)
    assert run.notes[1:] == [
        "shortening the run from 20 to 12 epochs (5 done)",
        "warning: the learning-rate step at milestone 15 (x0.1 from epoch 16 on) is no longer "
        "reached in 12 epochs",
    ]
    run = RunFolder.open(tmp_path / "r", {**config, "epochs": 30}, resume=True)
    assert run.notes[1:] == ["extending the run from 20 to 30 epochs (5 done)"]


# --- argument checks before anything is written ----------------------------------------------


def test_too_small_input_and_empty_output_are_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    code = main(["train", "--preset", "tiny", "--output", str(out), "--input-size", "16", "16"])
    assert code == 2
    one_error_line(
        capsys.readouterr().err,
        f"--input-size 16 16 is too small: the network needs at least {MIN_INPUT_SIZE} "
        f"{MIN_INPUT_SIZE} (its global branch downsamples by {MIN_INPUT_SIZE})",
    )
    code = main(["train", "--preset", "tiny", "--output", ""])
    assert code == 2
    one_error_line(capsys.readouterr().err, "--output is empty (an unset shell variable?)")
    assert not out.exists() and not Path("runs/tiny").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])  # the two block types
def test_the_minimum_input_size_is_the_global_branch_stride(backbone: str) -> None:
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        model = LAGNet(1, backbone=backbone)
    out = model.global_branch(model.stem(torch.empty(1, 3, 1024, 512, device="meta")))
    assert (1024 // out.shape[2], 512 // out.shape[3]) == (MIN_INPUT_SIZE, MIN_INPUT_SIZE)


# --- display: epoch timing and the curves' axis ----------------------------------------------


def test_epoch_lines_carry_time_per_epoch_and_time_left() -> None:
    assert epoch_timing(25.0, 2, 18) == "  (12.5 s/epoch, about 3 min 45 s left)"
    assert epoch_timing(7200.0, 1, 3) == "  (7200.0 s/epoch, about 6 h 00 min left)"
    assert epoch_timing(3.0, 3, 0) == "  (1.0 s/epoch, done)"


def test_curves_with_one_evaluation_span_the_run() -> None:
    pytest.importorskip("matplotlib")
    from lagnet.viz import plot_training_curves

    history: list[dict[str, Any]] = [{"epoch": e, "loss": 1.0 / e} for e in range(1, 11)]
    history[-1]["mAP"] = 0.5
    loss_ax, metric_ax = plot_training_curves(history).get_axes()
    assert metric_ax.get_xlim() == loss_ax.get_xlim() == pytest.approx((0.55, 10.45))
    assert all(float(t).is_integer() for t in metric_ax.get_xticks())
    single = plot_training_curves([{"epoch": 1, "loss": 1.0, "mAP": 0.5}]).get_axes()[1]
    assert single.get_xlim() == (0.5, 1.5)
