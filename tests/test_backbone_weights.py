"""ImageNet trunks through torchvision's weights enums, with no network at all.

The "download" is a ``file://`` URL of a ResNet-18 state dict the test writes, named as
torchvision names its files (``resnet18-<sha256 prefix>.pth``), into a temporary ``TORCH_HOME``.
Every test here fails if anything opens a network socket.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from lagnet.backbones import download_weights, resolve_backbone_weights
from lagnet.cli import main
from lagnet.cli.train_config import add_train_arguments, config_from_args
from lagnet.model import build_lagnet

W18 = torchvision.models.ResNet18_Weights
W50 = torchvision.models.ResNet50_Weights


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no torch.hub.set_dir() in effect
    return home


def published(
    folder: Path, state: dict[str, torch.Tensor], *, hash_of: bytes | None = None
) -> Path:
    """``state`` saved as ``folder/resnet18-<hash>.pth``; the hash is of ``hash_of`` if given
    (a file whose name does not match its content), else of the file itself."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    data = tmp.read_bytes()
    digest = hashlib.sha256(data if hash_of is None else hash_of).hexdigest()[:8]
    path = folder / f"resnet18-{digest}.pth"
    tmp.rename(path)
    return path


@pytest.fixture
def imagenet18(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any]:
    """A seeded ResNet-18 published at a ``file://`` URL as ResNet18_Weights.IMAGENET1K_V1."""
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18()
    source = published(tmp_path / "server", resnet.state_dict())
    monkeypatch.setattr(W18.IMAGENET1K_V1.value, "url", source.as_uri())
    return source, resnet


def point_at(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setattr(W18.IMAGENET1K_V1.value, "url", path.as_uri())


def test_imagenet_is_downloaded_once_hash_checked_and_loaded_into_the_trunk(
    torch_home: Path,
    imagenet18: tuple[Path, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, resnet = imagenet18
    model = build_lagnet(5, backbone="resnet18", num_attentions=4, backbone_weights="imagenet")
    cached = torch_home / "hub" / "checkpoints" / source.name
    assert cached.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == [source.name]  # no leftovers
    assert f"downloading {source.as_uri()} to {str(cached)!r}" in capsys.readouterr().err
    # the trunk is the file: stem, and layer4 in every branch (stride changed, weights not)
    assert torch.equal(model.stem[0].weight, resnet.conv1.weight)
    assert torch.equal(model.stem[1].running_var, resnet.bn1.running_var)
    for branch in (model.global_branch, model.part_branch, model.la_branch):
        assert torch.equal(branch[1][1].conv2.weight, resnet.layer4[1].conv2.weight)
        assert torch.equal(branch[0][0].conv1.weight, resnet.layer3[1].conv1.weight)

    # reused from the cache: no second download, even with the server gone
    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    source.unlink()
    again = build_lagnet(5, backbone="resnet18", num_attentions=4, backbone_weights="imagenet")
    assert torch.equal(again.stem[0].weight, resnet.conv1.weight)


@pytest.mark.parametrize(
    "name", ["imagenet", "IMAGENET", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"]
)
def test_names_and_enums_resolve_without_network(name: str) -> None:
    assert resolve_backbone_weights("resnet18", name) is W18.IMAGENET1K_V1
    assert resolve_backbone_weights("resnet18", W18.IMAGENET1K_V1) is W18.IMAGENET1K_V1
    assert resolve_backbone_weights("resnet50", "IMAGENET1K_V2") is W50.IMAGENET1K_V2
    assert resolve_backbone_weights("resnet50", "imagenet") is W50.IMAGENET1K_V1  # the paper's
    assert resolve_backbone_weights("resnet18", "weights/r18.pth") == Path("weights/r18.pth")
    assert resolve_backbone_weights("resnet18", None) is None


def test_wrong_names_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'ResNet50_Weights.IMAGENET1K_V2' are not weights of "
                       r"resnet18 \(its weights are ResNet18_Weights\.\*\)"):  # fmt: skip
        build_lagnet(5, backbone="resnet18", backbone_weights="ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ValueError, match=r"ResNet50_Weights.IMAGENET1K_V2 are not weights of "
                       "resnet18"):  # fmt: skip
        build_lagnet(5, backbone="resnet18", backbone_weights=W50.IMAGENET1K_V2)
    with pytest.raises(
        ValueError,
        match=r"'IMAGENET1K_V2' is neither a file nor a member of ResNet18_Weights; expected "
        r"'imagenet', one of IMAGENET1K_V1, DEFAULT, or a file path",
    ):
        build_lagnet(5, backbone="resnet18", backbone_weights="IMAGENET1K_V2")
    with pytest.raises(TypeError, match="backbone_weights must be None, 'imagenet', .* got int"):
        build_lagnet(5, backbone="resnet18", backbone_weights=3)  # type: ignore[arg-type]


def test_a_pre_seeded_hub_cache_is_used_offline(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(4)
    resnet = torchvision.models.resnet18()
    seeded = published(torch_home / "hub" / "checkpoints", resnet.state_dict())
    point_at(monkeypatch, tmp_path / "offline" / seeded.name)  # a URL that cannot be read
    model = build_lagnet(5, backbone="resnet18", num_attentions=4, backbone_weights="imagenet")
    assert torch.equal(model.la_branch[1][0].conv1.weight, resnet.layer4[0].conv1.weight)


def test_a_corrupted_download_is_refused_and_kept_aside(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = published(tmp_path / "server", torchvision.models.resnet18().state_dict(),
                       hash_of=b"something else")  # fmt: skip
    point_at(monkeypatch, served)
    folder = torch_home / "hub" / "checkpoints"
    with pytest.raises(ValueError) as info:
        build_lagnet(5, backbone="resnet18", backbone_weights="imagenet")
    expected = served.name.split("-")[1].split(".")[0]
    actual = hashlib.sha256(served.read_bytes()).hexdigest()
    assert str(info.value).startswith(
        f"refusing the download of ResNet18_Weights.IMAGENET1K_V1 from {served.as_uri()}: its "
        f"SHA-256 is {actual}, but the file name expects {expected}...; the download is kept at "
        f"{str(folder / (served.name + '.corrupt'))!r} and nothing was put in the cache."
    )
    assert sorted(p.name for p in folder.iterdir()) == [served.name + ".corrupt"]
    assert (folder / (served.name + ".corrupt")).read_bytes() == served.read_bytes()


def test_a_corrupt_file_in_the_cache_is_refused_and_left_in_place(
    torch_home: Path, imagenet18: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = imagenet18
    cached = torch_home / "hub" / "checkpoints" / source.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(source.read_bytes()[:-10] + b"0123456789")  # replaced on disk
    before = cached.read_bytes()
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    with pytest.raises(
        ValueError,
        match=rf"refusing ResNet18_Weights.IMAGENET1K_V1 in the torch hub cache: "
        rf"'{cached}' has SHA-256 [0-9a-f]{{64}}, but its name expects "
        rf"{source.name[9:17]}\.\.\. .*it is left where it is: delete it",
    ):
        build_lagnet(5, backbone="resnet18", backbone_weights="imagenet")
    assert cached.read_bytes() == before


def test_offline_is_one_clear_error(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url_path = tmp_path / "offline" / "resnet18-abcdef12.pth"
    point_at(monkeypatch, url_path)
    cached = torch_home / "hub" / "checkpoints" / url_path.name
    with pytest.raises(OSError) as info:
        download_weights(W18.IMAGENET1K_V1, progress=False)
    message = str(info.value)
    assert message.startswith(
        f"cannot download ResNet18_Weights.IMAGENET1K_V1 from {url_path.as_uri()} ("
    )
    assert message.endswith(
        f"it is expected in the torch hub cache at {str(cached)!r} (TORCH_HOME): put the file "
        "there, or pass backbone_weights=PATH (--backbone-weights PATH) with a local copy of "
        "the file"
    )
    assert "\n" not in message
    assert sorted(p.name for p in cached.parent.iterdir()) == []  # no partial file left


def test_cli_offline_is_one_line_and_writes_no_run(
    torch_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, tmp_path / "offline" / "resnet18-abcdef12.pth")
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--root", str(tmp_path / "data"), "--output",
                 str(out), "--backbone-weights", "imagenet", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("lagnet: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    assert errors[0].startswith(
        "lagnet: error: cannot download ResNet18_Weights.IMAGENET1K_V1 from file://"
    )
    assert "--backbone-weights PATH" in errors[0]
    assert not (out / "last.pth").exists() and not (out / "config.json").exists()


def config_of(*argv: str) -> Any:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_reference_preset_chooses_imagenet_weights_by_default(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert config_of("--preset", "reference", "--root", root).backbone_weights == "imagenet"
    assert config_of("--preset", "reference", "--root", root, "--backbone-weights",
                     "none").backbone_weights is None  # fmt: skip
    assert config_of("--preset", "reference", "--root", root, "--backbone-weights",
                     "IMAGENET1K_V2").backbone_weights == "IMAGENET1K_V2"  # fmt: skip
    assert config_of("--preset", "tiny").backbone_weights is None
    local = tmp_path / "r18.pth"
    local.write_bytes(b"")
    assert config_of("--preset", "tiny", "--backbone-weights", str(local)).backbone_weights == (
        str(local)
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing.pth", "--backbone-weights 'missing.pth': no such file (or pass imagenet"),
        ("IMAGENET1K_V9", "--backbone-weights 'IMAGENET1K_V9' is neither a file nor a member of "
                          "ResNet18_Weights"),
        ("ResNet50_Weights.DEFAULT", "--backbone-weights 'ResNet50_Weights.DEFAULT' are not "
                                     "weights of resnet18"),
    ],
)  # fmt: skip
def test_bad_backbone_weights_flags_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str, message: str
) -> None:
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--output", str(out), "--root", str(tmp_path),
                 "--backbone-weights", value])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"lagnet: error: {message}") and len(err.splitlines()) == 1
    assert not out.exists()
