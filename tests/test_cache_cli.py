"""``--cache`` of lagnet train / evaluate / embed: same features either way, corrupt images
named before any work, the fallback notice, the disk cache reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import lagnet.data.cached_loader as cached_loader
from lagnet.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def corrupt_copy(data_root: Path, target: Path, split: str) -> Path:
    """A copy of the dataset with one image of ``split`` cut short; returns that image."""
    shutil.copytree(data_root, target)
    files = sorted((target / split).glob("*.jpg"))
    victim = [p for p in files if not p.name.startswith(("-1_", "0000_"))][1]  # a scored image
    victim.write_bytes(victim.read_bytes()[:300])
    return victim


def test_evaluate_gives_the_same_scores_with_every_cache(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path
) -> None:
    reports = {}
    for cache in ("off", "host", "device", "auto"):
        code, out, err = run_cli(
            capsys, "evaluate", "--weights", str(weights), "--dataset", "synthetic",
            "--root", str(data_root), "--json", "--cache", cache,
        )  # fmt: skip
        assert code == 0, err
        reports[cache] = json.loads(out)  # stdout stays pure JSON: cache lines go to stderr
        if cache == "off":
            assert err == ""
        else:
            lines = err.splitlines()
            assert len(lines) == 2 and lines[0].startswith("image cache: 16 images at 64x32")
            assert lines[1].startswith("image cache: 20 images at 64x32, 120.0 KiB uint8 on cpu")
    assert reports["host"] == reports["off"] == reports["device"] == reports["auto"]


def test_embed_features_are_bit_identical_with_and_without_the_cache(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path, tmp_path: Path
) -> None:
    features = {}
    for cache in ("off", "host"):
        out = tmp_path / f"{cache}.npz"
        code, _, err = run_cli(
            capsys, "embed", "--weights", str(weights), "--images", str(data_root / "query"),
            "--output", str(out), "--cache", cache, "--flip", "--no-progress",
        )  # fmt: skip
        assert code == 0, err
        with np.load(out) as npz:
            features[cache] = npz["features"]
    assert features["off"].shape == (16, 3584)
    np.testing.assert_array_equal(features["host"], features["off"])


def test_disk_cache_is_reused(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path, tmp_path: Path
) -> None:
    args = ["evaluate", "--weights", str(weights), "--dataset", "synthetic", "--root",
            str(data_root), "--json", "--cache", "host",
            "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    code, first, err = run_cli(capsys, *args)
    assert code == 0 and err.count("decoded in") == 2, err
    assert len(list((tmp_path / "c").iterdir())) == 2  # query and gallery
    code, second, err = run_cli(capsys, *args)
    assert code == 0 and err.count("loaded from") == 2, err
    assert json.loads(first) == json.loads(second)


def test_auto_fallback_prints_one_notice_and_still_evaluates(
    capsys: pytest.CaptureFixture[str],
    weights: Path,
    data_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cached_loader, "available_memory", lambda: 1000)
    code, out, err = run_cli(
        capsys, "evaluate", "--weights", str(weights), "--dataset", "synthetic",
        "--root", str(data_root), "--json",
    )  # fmt: skip
    assert code == 0, err
    notice = "image cache off: 0.00 GiB does not fit in 0.5 of the available RAM (0.00 GiB); "
    assert err.splitlines() == [notice + "decoding with DataLoader workers instead"] * 2
    assert 0.0 < json.loads(out)["mAP"] <= 1.0


def test_corrupt_training_image_stops_before_training(
    capsys: pytest.CaptureFixture[str], data_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    victim = corrupt_copy(data_root, root, "bounding_box_train")
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--preset", "tiny", "--dataset", "market1501", "--root", str(root),
        "--output", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("lagnet: error: 1 of 32 images cannot be read (fix or remove them):")
    assert str(victim) in lines[0]
    assert "epoch" not in stdout
    assert not out.exists()  # nothing written


def test_corrupt_gallery_image_is_one_error_line(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    victim = corrupt_copy(data_root, root, "bounding_box_test")
    for cache in ("auto", "off"):
        code, out, err = run_cli(
            capsys, "evaluate", "--weights", str(weights), "--dataset", "market1501",
            "--root", str(root), "--no-progress", "--cache", cache,
        )  # fmt: skip
        assert code == 2 and out == ""
        lines = err.splitlines()
        assert len(lines) == 2 - (cache == "off"), err  # the query cache's line, then the error
        assert lines[-1].startswith("lagnet: error: ") and str(victim) in lines[-1]


def test_bad_cache_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "evaluate", "--weights", "w", "--dataset", "synthetic",
                           "--root", ".", "--cache", "gpu")  # fmt: skip
    assert code == 2
    assert err.startswith("lagnet: error: lagnet evaluate: argument --cache: invalid choice: 'gpu'")
    assert len(err.splitlines()) == 1


def test_embed_amp_and_channels_last(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path, tmp_path: Path
) -> None:
    features = {}
    settings = {
        "plain": [],
        "auto": ["--amp", "auto"],  # float32 on the CPU: the plain features, bit for bit
        "cl": ["--channels-last"],
        "bf16": ["--amp", "bf16", "--channels-last"],
    }
    for name, extra in settings.items():
        out = tmp_path / f"{name}.npz"
        code, _, err = run_cli(
            capsys, "embed", "--weights", str(weights), "--images", str(data_root / "query"),
            "--output", str(out), "--no-progress", *extra,
        )  # fmt: skip
        assert code == 0, err
        with np.load(out) as npz:
            features[name] = npz["features"]
    np.testing.assert_array_equal(features["auto"], features["plain"])
    np.testing.assert_allclose(features["cl"], features["plain"], rtol=0, atol=1e-5)
    assert not np.array_equal(features["bf16"], features["plain"])  # autocast really ran
    cosine = (features["bf16"] * features["plain"]).sum(1)  # both L2-normalised
    assert cosine.min() > 0.99, cosine.min()


def test_evaluate_refuses_an_unknown_amp(
    capsys: pytest.CaptureFixture[str], weights: Path, data_root: Path
) -> None:
    code, _, err = run_cli(
        capsys, "evaluate", "--weights", str(weights), "--dataset", "synthetic",
        "--root", str(data_root), "--amp", "fp8",
    )  # fmt: skip
    assert code == 2
    err = err.strip().splitlines()
    assert len(err) == 1 and "--amp" in err[0] and "'fp8'" in err[0], err
