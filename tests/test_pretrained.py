"""Pretrained folders (model.safetensors + config.json): save, load by folder or hub id, and
every ``--weights`` form of the ``lagnet`` commands. Nothing here reaches the network."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lagnet
from lagnet.checkpoint import save_checkpoint
from lagnet.cli import main
from lagnet.model import LAGNet, build_lagnet
from lagnet.pretrained import load_weights

SIZE = (64, 32)
MODEL_ARGS = {
    "num_classes": 6, "backbone": "resnet18", "num_attentions": 4, "embed_dim": 64,
    "reduce_dim": 32, "drop_threshold": 0.4,
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("no_network")


def trained_like(variant: str, seed: int = 0) -> LAGNet:
    """A small model whose batch-norm statistics moved away from their initial values."""
    torch.manual_seed(seed)
    model = build_lagnet(variant=variant, **MODEL_ARGS)  # type: ignore[arg-type]
    with torch.no_grad():
        model.train().forward_train(torch.randn(4, 3, *SIZE))
    return model.eval()


def embed(model: LAGNet, seed: int = 1) -> torch.Tensor:
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.embed(x)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = trained_like("paper")
    path = tmp_path_factory.mktemp("pretrained") / "market-r18"
    lagnet.save_pretrained(model, path, metrics={"mAP": 0.5, "rank1": 0.75}, input_size=SIZE)
    return path


# --- save_pretrained -> from_pretrained ------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_round_trip_is_bit_identical_from_the_folder_alone(tmp_path: Path, variant: str) -> None:
    model = trained_like(variant)
    assert lagnet.save_pretrained(model, tmp_path / "m", input_size=SIZE) == tmp_path / "m"
    again = lagnet.from_pretrained(tmp_path / "m")
    assert not again.training
    assert (again.variant, again.num_classes, again.embed_dim, again.reduce_dim) == (
        variant, 6, 64, 32,
    )  # fmt: skip
    assert again.drop.threshold == 0.4 and again.num_attentions == 4
    assert torch.equal(embed(again), embed(model))
    ours, theirs = model.state_dict(), again.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_model_on_any_device_and_layout_round_trips(tmp_path: Path, device: torch.device) -> None:
    model = trained_like("paper").to(device, memory_format=torch.channels_last)
    lagnet.save_pretrained(model, tmp_path / "m", input_size=SIZE)
    again = lagnet.from_pretrained(tmp_path / "m", device=device)
    assert next(again.parameters()).device.type == device.type
    ours, theirs = model.state_dict(), again.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        got, expected = again(x), model.to(memory_format=torch.contiguous_format)(x)
    if device.type == "cpu":
        assert torch.equal(got, expected)
    else:  # the same weights; cuDNN may pick other kernels for two module instances
        torch.testing.assert_close(got, expected)


def test_the_folder_holds_two_files_and_no_pickle(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for path in folder.iterdir():
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80"), path  # pickle protocol >= 2
        assert not head.startswith(b"PK\x03\x04"), path  # torch.save's zip


def test_config_records_everything_that_rebuilds_the_model(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config == {
        "library_name": "lagnet",
        "lagnet_version": lagnet.__version__,
        "model_args": {**MODEL_ARGS, "variant": "paper"},
        "input_size": [64, 32],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "feature_dim": 7 * 64,
        "metrics": {"mAP": 0.5, "rank1": 0.75},
    }


def test_save_pretrained_checks_its_arguments(tmp_path: Path) -> None:
    model = trained_like("paper")
    with pytest.raises(TypeError, match="save_pretrained needs a LAGNet, got Linear"):
        lagnet.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_size must be at least 32x32, got 16x32"):
        lagnet.save_pretrained(model, tmp_path / "a", input_size=(16, 32))
    with pytest.raises(ValueError, match=r"metrics\['mAP'\] must be finite, got nan"):
        lagnet.save_pretrained(model, tmp_path / "a", metrics={"mAP": float("nan")})
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="'.*file' exists and is not a folder"):
        lagnet.save_pretrained(model, tmp_path / "file")
    assert not (tmp_path / "a").exists()


def test_build_lagnet_takes_every_form_without_num_classes(folder: Path, tmp_path: Path) -> None:
    reference = embed(lagnet.from_pretrained(folder))
    best = tmp_path / "best.pth"
    model = lagnet.from_pretrained(folder)
    save_checkpoint(
        {"model": model.state_dict(), "model_config": {
            "num_classes": 6, "backbone": "resnet18", "variant": "paper", "num_attentions": 4,
            "height": 64, "width": 32}},
        best,
    )  # fmt: skip
    built = [
        build_lagnet(weights=folder),
        build_lagnet(weights=folder / "model.safetensors"),
        build_lagnet(6, weights=folder, backbone="resnet18"),  # agreeing arguments are fine
        build_lagnet(weights=best, embed_dim=64, reduce_dim=32, drop_threshold=0.4),
    ]
    for model in built:
        assert torch.equal(embed(model.eval()), reference)
    with pytest.raises(ValueError, match=r"records another model than asked: num_classes=7 "
                       r"\(the weights record 6\), variant='reference' \(the weights record "
                       r"'paper'\)"):  # fmt: skip
        build_lagnet(7, weights=folder, variant="reference")
    with pytest.raises(TypeError, match="build_lagnet needs num_classes, or weights= that"):
        build_lagnet()


def test_hub_id_goes_through_snapshot_download(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = lagnet.from_pretrained("someone/market-r18", revision="v1")
    assert calls == [
        {
            "repo_id": "someone/market-r18",
            "revision": "v1",
            "allow_patterns": ["config.json", "model.safetensors"],
            "library_name": "lagnet",
        }
    ]
    assert torch.equal(embed(model), embed(lagnet.from_pretrained(folder)))


def test_hub_failures_and_unknown_names_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def offline(**kwargs: Any) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match=r"^'org/name' is no local folder, and getting it from the "
                       r"Hugging Face Hub failed \(cannot reach the Hub\); check the path or the "
                       "hub id and the network$"):  # fmt: skip
        lagnet.from_pretrained("org/name")
    with pytest.raises(FileNotFoundError, match="neither an existing folder or file nor a hub id"):
        lagnet.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        lagnet.from_pretrained(tmp_path / "nope")


def test_without_the_hub_extra_the_message_names_it(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("safetensors", "safetensors.torch", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    extra = r'which is not installed: pip install "lagnet\[hub\]"$'
    with pytest.raises(ImportError, match="save_pretrained needs the optional package "
                       f"'safetensors.torch', {extra}"):  # fmt: skip
        lagnet.save_pretrained(trained_like("paper"), folder.parent / "x")
    with pytest.raises(ImportError, match=f"from_pretrained needs .*{extra}"):
        lagnet.from_pretrained(folder)
    with pytest.raises(ImportError, match=f"loading a .safetensors file needs .*{extra}"):
        build_lagnet(weights=folder)
    assert not (folder.parent / "x").exists()


@pytest.mark.slow
def test_import_lagnet_needs_no_hub_extra() -> None:
    code = (
        "import sys; sys.modules['safetensors'] = sys.modules['huggingface_hub'] = None; "
        "import lagnet; print(lagnet.save_pretrained.__name__, lagnet.from_pretrained.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "save_pretrained from_pretrained\n"


# --- safety and compatibility ----------------------------------------------------------------


def copy_folder(folder: Path, target: Path, **config_changes: Any) -> Path:
    target.mkdir()
    (target / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    for key, value in config_changes.items():
        if key in config["model_args"] or key == "extra_arg":
            config["model_args"][key] = value
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone": "resnet9"}, r"config.json': unknown backbone 'resnet9' \(key 'backbone'\); "
                                  "this lagnet knows resnet18, resnet34"),
        ({"variant": "Paper"}, r"config.json': unknown variant 'Paper' \(key 'variant'\); this "
                               "lagnet knows paper, reference"),
        ({"lagnet_version": "0.2.0"}, r"config.json' was written by lagnet 0.2.0, newer than "
                                      r"this lagnet 0.1.0.dev0; upgrade lagnet to load it"),
        ({"extra_arg": 1}, r"unknown model setting\(s\) extra_arg \(written by another lagnet "
                           "version\\?\\)"),
    ],
)  # fmt: skip
def test_a_config_this_lagnet_cannot_build_says_why(
    folder: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    bad = copy_folder(folder, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message):
        lagnet.from_pretrained(bad)


def test_an_older_minor_or_patch_version_loads(folder: Path, tmp_path: Path) -> None:
    old = copy_folder(folder, tmp_path / "old", lagnet_version="0.1.5")
    assert torch.equal(embed(lagnet.from_pretrained(old)), embed(lagnet.from_pretrained(folder)))


def test_weights_that_do_not_fit_the_config_name_the_keys(folder: Path, tmp_path: Path) -> None:
    bad = copy_folder(folder, tmp_path / "bad", num_classes=9)
    with pytest.raises(ValueError) as info:
        lagnet.from_pretrained(bad)
    shown = ", ".join(
        f"'{key}.classifier.weight: expected (9, 64), got (6, 64)'"
        for key in ("drop_head", "global_head.head", "la_head", "part_head.head",
                    "part_head.stripe_heads.0")
    )  # fmt: skip
    assert str(info.value) == (
        f"cannot load {bad / 'model.safetensors'} into LAGNet: mis-shaped keys: [{shown}] "
        "(and 2 more)"
    )


def test_a_pickle_named_safetensors_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (Path.write_text, (marker, "pwned"))  # type: ignore[return-value]

    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": Payload()}))
    (bad / "config.json").write_text(json.dumps({
        "lagnet_version": "0.1.0", "model_args": {**MODEL_ARGS, "variant": "paper"}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"evil/model.safetensors' is not a safetensors file "
                       r"\(.*\); nothing in it was executed"):  # fmt: skip
        lagnet.from_pretrained(bad)
    assert not marker.exists()


def test_missing_files_of_the_pair_are_named(folder: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "w.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json' not found: a pretrained folder "
                       "holds model.safetensors and config.json"):  # fmt: skip
        build_lagnet(weights=lone / "w.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pth").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError,
        match=r"'.*run' is a run folder without pretrained/ \(lagnet train writes it at the end "
        r"of a run\); pass '.*run/best.pth'",
    ):
        build_lagnet(weights=run)
    (lone / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="config.json' is not a JSON file"):
        load_weights(lone / "w.safetensors")


# --- the lagnet commands ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_best(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a ``best.pth`` in the layout ``lagnet train`` writes."""
    torch.manual_seed(0)
    model = build_lagnet(8, backbone="resnet18", num_attentions=4)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": {
                "num_classes": 8, "backbone": "resnet18", "variant": "paper",
                "num_attentions": 4, "height": 64, "width": 32,
            },
            "metrics": {"mAP": 0.25},
            "epoch": 2,
        },
        run / "best.pth",
    )  # fmt: skip
    return run / "best.pth"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_export_safetensors_then_embed_and_evaluate_from_the_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_best: Path, data_root: Path
) -> None:
    folder = tmp_path / "shared"
    code, out, err = cli(capsys, "export", "--weights", str(run_best), "--format", "safetensors",
                         "--output", str(folder))  # fmt: skip
    assert (code, err) == (0, "")
    assert out == f"wrote {folder}/ (model.safetensors + config.json, input 64x32)\n"
    config = json.loads((folder / "config.json").read_text())
    assert (config["input_size"], config["metrics"]) == ([64, 32], {"mAP": 0.25})
    assert config["model_args"]["num_classes"] == 8

    features = {}
    for name, weights in [
        ("pth", run_best),
        ("folder", folder),
        ("file", folder / "model.safetensors"),
        ("run", run_best.parent),
    ]:
        if name == "run":  # a run folder stands for its pretrained/ folder
            (run_best.parent / "pretrained").mkdir(exist_ok=True)
            for f in folder.iterdir():
                (run_best.parent / "pretrained" / f.name).write_bytes(f.read_bytes())
        npz = tmp_path / f"{name}.npz"
        code, out, err = cli(capsys, "embed", "--weights", str(weights), "--no-progress",
                             "--images", str(data_root / "query"),
                             "--output", str(npz))  # fmt: skip
        assert code == 0, err
        features[name] = np.load(npz)["features"]
    for name in ("folder", "file", "run"):
        assert np.array_equal(features[name], features["pth"]), name

    scores = []
    for weights in (run_best, folder):
        code, out, err = cli(capsys, "evaluate", "--weights", str(weights), "--json",
                             "--dataset", "market1501", "--root", str(data_root),
                             "--no-progress")  # fmt: skip
        assert code == 0, err
        scores.append({k: v for k, v in json.loads(out).items() if k != "weights"})
    assert scores[0] == scores[1]

    code, out, err = cli(capsys, "export", "--weights", str(run_best), "--format", "safetensors",
                         "--output", str(folder))  # fmt: skip
    assert code == 2
    assert err == (f"lagnet: error: --output {str(folder)!r} already holds model.safetensors and "
                   "config.json; pass --overwrite to replace them\n")  # fmt: skip


@pytest.mark.slow
def test_onnx_export_from_the_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: Path
) -> None:
    pytest.importorskip("onnx", reason="needs the onnx extra: lagnet[onnx]")
    pytest.importorskip("onnxscript", reason="needs the onnx extra: lagnet[onnx]")
    ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra: lagnet[onnx]")
    out = tmp_path / "model.onnx"
    code, stdout, err = cli(capsys, "export", "--weights", str(folder), "--output", str(out))
    assert code == 0, err
    assert stdout == f"wrote {out} (input 64x32, ImageNet-normalised input)\n"
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = lagnet.from_pretrained(folder)(x)
    np.testing.assert_allclose(onnx_out, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_weights_without_a_configuration_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_root: Path
) -> None:
    bare = tmp_path / "bare.pth"
    torch.save(build_lagnet(8, backbone="resnet18", num_attentions=4).state_dict(), bare)
    code, out, err = cli(capsys, "embed", "--weights", str(bare), "--images",
                         str(data_root / "query"), "--output", str(tmp_path / "f.npz"))  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith(
        f"lagnet: error: --weights {str(bare)!r} is not a checkpoint of `lagnet train` (best.pth), "
        "a pretrained folder (model.safetensors + config.json) or a .safetensors file with its "
        "config.json: it records no model configuration"
    )
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "f.npz").exists()
