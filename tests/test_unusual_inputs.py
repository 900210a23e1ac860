"""Unusual inputs of issue 16 section 3 and 4: each gives a clear error, a warning, or documented
behaviour (engine, CLI, retrieval, images, checkpoints)."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lagnet import LAGNet, LAGNetLoss, build_lagnet
from lagnet.cli import main
from lagnet.engine import NonFiniteLossError, TrainStep, _describe_non_finite, train_one_epoch
from lagnet.evaluation import extract_features

LABELS = torch.tensor([0, 0, 1, 1])


def small() -> LAGNet:
    torch.manual_seed(0)
    return build_lagnet(5, backbone="resnet18", num_attentions=4).train()


def images(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


def make_step(
    model: LAGNet | None = None, *, lr: float = 1e-4, adam: bool = False
) -> tuple[LAGNet, TrainStep]:
    model = small() if model is None else model
    criterion = LAGNetLoss(5, model.attention_dim)
    opt_class = torch.optim.Adam if adam else torch.optim.SGD
    optimizer = opt_class(model.parameters(), lr=lr)
    return model, TrainStep(model, criterion, optimizer)


def one_error_line(err: str, expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lagnet: error: {expected}"), lines[0]
    assert "Traceback" not in err


# --- the engine: diverging training, non-finite inputs, optimizer, eval mode, dict batches ----


def test_diverging_training_stops_as_a_non_finite_loss_naming_the_batch() -> None:
    # lr=1e30: batch 0's loss is finite, its update makes the weights ~1e30 (still finite), and
    # batch 1's forward pass overflows. The CPU names it (a GPU sees a NaN loss at batch 1).
    _, step = make_step(lr=1e30, adam=True)
    batches = [(images(i), LABELS) for i in range(3)]
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(step, batches, epoch=3, log_every=1, progress=False)
    err = info.value
    assert (err.epoch, err.batch) == (3, 1) and err.value != err.value  # NaN
    assert err.detail is not None
    assert str(err).startswith("the training diverged at epoch 3, batch 1 (0-based): ")
    assert "the forward pass produced NaN or infinite activations (first in 'stem." in str(err)
    assert "from finite input images; the largest weight is 1e+30" in str(err)
    assert "attention_maps" not in str(err)


def test_diverged_train_step_alone_raises_floating_point_error() -> None:
    model, step = make_step(lr=1e30, adam=True)
    assert torch.isfinite(step(images(0), LABELS).loss)
    with pytest.raises(FloatingPointError, match="produced NaN or infinite activations"):
        step(images(1), LABELS)
    # the diagnosis replays the forward pass without touching the RNG or the BN statistics
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    detail = _describe_non_finite(step, images(1), LABELS)
    assert detail is not None and "(first in 'stem." in detail
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=0, atol=0, equal_nan=True)


def test_non_finite_weights_are_named() -> None:
    model, step = make_step()
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError) as info:
        step(images(0), LABELS)
    assert str(info.value).startswith(
        "the model's weights hold NaN or infinite values (1 of 168 tensors, e.g. 'stem.0.weight')"
    )


def test_nan_input_image_is_named_as_an_input_and_changes_nothing() -> None:
    model, step = make_step(lr=0.1)
    bad = images(1)
    bad[2, 0, 3, 3] = float("nan")
    bad[2, 1, 0, 0] = float("inf")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as info:
        step(bad, LABELS)
    assert str(info.value).startswith(
        "the input images hold 2 NaN or infinite values in sample(s) [2]; "
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match=r"^epoch 4, batch 1: the input images hold 2 NaN"):
        train_one_epoch(step, [(images(0), LABELS), (bad, LABELS)], epoch=4, progress=False)
    # finite values whose sum overflows (the fast check) are finite inputs: no input error
    huge = torch.full((4, 3, 64, 32), 3e38)
    prepared, _ = step._prepare(huge, LABELS)
    assert torch.equal(prepared, huge)


def test_optimizer_that_does_not_own_the_model_is_refused() -> None:
    model = small()
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError) as info:
        TrainStep(model, LAGNetLoss(5, model.attention_dim), torch.optim.SGD(other.parameters()))
    assert str(info.value) == (
        "the optimizer holds none of the model's 168 trainable parameters (it holds 2 other "
        "tensor(s)), so the weights would never change; build it over model.parameters()"
    )


def test_model_in_eval_mode_warns_once() -> None:
    model, step = make_step()
    model.eval()
    with pytest.warns(UserWarning, match="the model is in eval mode") as record:
        step(images(0), LABELS)
        step(images(1), LABELS)
    assert len([w for w in record if "eval mode" in str(w.message)]) == 1
    model.train()
    _, trained = make_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained(images(0), LABELS)


def test_dict_batches_with_other_keys_name_the_expected_keys() -> None:
    _, step = make_step()
    batch = {"img": images(0), "label": LABELS}
    with pytest.raises(ValueError) as info:
        train_one_epoch(step, [batch], progress=False)
    assert str(info.value) == (
        "batch 0: a dict batch needs the keys 'images' and 'pids'; it lacks ['images', 'pids'] "
        "(its keys: ['img', 'label'])"
    )
    with pytest.raises(ValueError) as info:
        extract_features(torch.nn.Flatten(), [batch], progress=False)
    assert str(info.value) == (
        "batch 0: a dict batch needs the keys 'images', 'pids' and 'camids'; it lacks "
        "['images', 'pids', 'camids'] (its keys: ['img', 'label'])"
    )


# --- lagnet index / search and the command line ----------------------------------------------


def write_embeddings(path: Path, features: np.ndarray, names: list[str]) -> None:
    np.savez(path, features=features.astype(np.float32), paths=np.array(names))


def test_ivfpq_on_a_small_gallery_says_how_many_items_it_needs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("faiss")
    from lagnet.retrieval import GalleryIndex

    feats = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    with pytest.raises(ValueError) as info:
        GalleryIndex.build(feats, kind="ivfpq")
    assert str(info.value) == (
        "kind 'ivfpq' needs at least 256 embeddings to train the 256 centroids of its 8-bit PQ "
        "codes, got 50; kind 'flat' is exact and right for small galleries"
    )
    with pytest.raises(ValueError) as info:  # every 3rd of the 50: 17
        GalleryIndex.build(feats, kind="ivf", nlist=30, max_train=20)
    assert str(info.value).startswith(
        "kind 'ivf' needs at least 30 embeddings to train its 30 inverted lists (nlist), got 17 "
        "(an evenly spaced sample of the 50, max_train=20); "
    )
    with pytest.raises(ValueError, match=r"^pca_dim=60 needs at least 60 embeddings to train th"):
        GalleryIndex.build(feats, kind="flat", pca_dim=60)
    assert len(GalleryIndex.build(feats, kind="ivfpq", pq_bits=4)) == 50  # 16 centroids: fine
    write_embeddings(tmp_path / "g.npz", feats, [f"{i}.jpg" for i in range(50)])
    out = tmp_path / "g.lagidx"
    code = main(["index", "--features", str(tmp_path / "g.npz"), "--output", str(out),
                 "--kind", "ivfpq"])  # fmt: skip
    assert code == 2
    one_error_line(capsys.readouterr().err, "kind 'ivfpq' needs at least 256 embeddings")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]


@pytest.mark.parametrize("command", ["index", "embed"])
def test_output_that_is_a_folder_is_refused_first_and_nothing_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    out = tmp_path / "out.npz"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    write_embeddings(tmp_path / "g.npz", np.eye(4, 8), ["a", "b", "c", "d"])
    if command == "index":
        args = ["index", "--features", str(tmp_path / "g.npz")]
    else:  # the weights are never read: the output is checked first
        args = ["embed", "--weights", str(tmp_path / "none.pth"), "--images", str(tmp_path)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main([*args, "--output", str(out), "--overwrite"])
    assert code == 2
    one_error_line(
        capsys.readouterr().err,
        f"--output {str(out)!r} is a folder; give the path of a file to write",
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "mine"


def test_index_paths_list_that_is_a_folder_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_embeddings(tmp_path / "g.npz", np.eye(4, 8), ["a", "b", "c", "d"])
    (tmp_path / "g.lagidx.paths.txt").mkdir()
    code = main(["index", "--features", str(tmp_path / "g.npz"), "--output",
                 str(tmp_path / "g.lagidx"), "--overwrite"])  # fmt: skip
    assert code == 2
    one_error_line(
        capsys.readouterr().err,
        f"{str(tmp_path / 'g.lagidx.paths.txt')!r} is a folder; give the path of a file",
    )
    assert not (tmp_path / "g.lagidx").exists()


def test_unknown_command_says_lagnet_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nosuchcmd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "lagnet: error: argument COMMAND: invalid choice: 'nosuchcmd' (choose from 'train', "
    )
    assert err.count("lagnet:") == 1 and len(err.splitlines()) == 1


@pytest.mark.slow  # a subprocess: the pipe is the point
def test_search_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    write_embeddings(tmp_path / "g.npz", rng.standard_normal((100, 8)), [
        f"gallery/{i:04d}.jpg" for i in range(100)
    ])  # fmt: skip
    write_embeddings(tmp_path / "q.npz", rng.standard_normal((300, 8)), [
        f"query/{i:04d}.jpg" for i in range(300)
    ])  # fmt: skip
    index = tmp_path / "g.lagidx"
    assert main(["index", "--features", str(tmp_path / "g.npz"), "--output", str(index)]) == 0
    # about 1.5 MB of JSON: far more than a pipe holds, so the write fails after `head` exits
    script = (
        f"{sys.executable} -m lagnet search --index {index} --queries {tmp_path / 'q.npz'} "
        "--k 50 --json | head -1; echo status=${PIPESTATUS[0]} >&2"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout == "[\n"
    assert done.stderr == "status=141\n"


# --- lagnet evaluate and lagnet embed ----------------------------------------------------------


def test_rerank_on_a_small_gallery_is_refused_before_extracting(
    capsys: pytest.CaptureFixture[str], data_root: Path, tmp_path: Path
) -> None:
    from lagnet.data import build_dataset

    gallery = len(build_dataset("synthetic", data_root).gallery)  # 20 (junk images left out)
    junk = tmp_path / "never-read.pth"  # refused before the weights are even loaded
    junk.write_bytes(b"not read")
    args = ["evaluate", "--weights", str(junk), "--dataset", "synthetic", "--root",
            str(data_root), "--rerank", "--no-progress"]  # fmt: skip
    code = main([*args, "--k1", str(gallery + 1)])
    assert code == 2
    one_error_line(
        capsys.readouterr().err,
        f"--rerank: k1={gallery + 1} is larger than the gallery ({gallery} items; ",
    )
    code = main([*args, "--k1", "0"])
    one_error_line(capsys.readouterr().err, "--rerank: k1 must be >= 1, got 0; lower --k1")


def test_embed_and_evaluate_give_the_same_features_by_default(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data_root: Path,
    weights: Path,
    tmp_path: Path,
) -> None:
    import lagnet.cli.evaluate as evaluate_cli

    seen: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = extract_features(*args, **kwargs)
        seen.append(out.features)
        return out

    monkeypatch.setattr(evaluate_cli, "extract_features", recording)
    code = main(["evaluate", "--weights", str(weights), "--dataset", "synthetic", "--root",
                 str(data_root), "--no-progress", "--json"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    query_files = sorted((data_root / "query").glob("*.jpg"))
    out = tmp_path / "q.npz"
    code = main(["embed", "--weights", str(weights), "--images", str(data_root / "query"),
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with np.load(out) as npz:
        names, embedded = npz["paths"].tolist(), npz["features"]
    assert names == [p.name for p in query_files]
    from lagnet.data import build_dataset

    order = [Path(r.path).name for r in build_dataset("synthetic", data_root).query]
    evaluated = seen[0].numpy()[[order.index(n) for n in names]]
    np.testing.assert_allclose(embedded, evaluated, rtol=1e-5, atol=1e-6)
    out.unlink()
    assert main(["embed", "--weights", str(weights), "--images", str(data_root / "query"),
                 "--output", str(out), "--no-progress", "--no-flip"]) == 0  # fmt: skip
    with np.load(out) as npz:
        assert np.abs(npz["features"] - embedded).max() > 1e-3  # without flip: other features


# --- files that are not what they should be ----------------------------------------------------


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b'{"num_classes": 751}\n', "a JSON file"),
        (b"  [1, 2]", "a JSON file"),
        (b"epoch 1 loss 2.3\n", "a text file"),
        (b"", "an empty file"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
        (b"\x93NUMPY\x01\x00", "a NumPy .npy array"),
    ],
)
def test_weights_that_are_not_a_checkpoint_say_what_they_are(
    tmp_path: Path, content: bytes, what: str
) -> None:
    from lagnet.checkpoint import load_checkpoint

    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, what="weights")
    assert str(info.value) == (
        f"weights file {str(path)!r} is not a checkpoint: it is {what} (a checkpoint is a file "
        "written by torch.save, such as best.pth or last.pth of lagnet train)"
    )


def test_weights_png_and_npz_on_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "a.png").write_bytes(_png_bytes())
    (tmp_path / "w.png").write_bytes(_png_bytes())
    np.savez(tmp_path / "w.npz", features=np.zeros((1, 2)))
    for name, what in (("w.png", "a PNG image"), ("w.npz", "a NumPy .npz archive")):
        code = main(["embed", "--weights", str(tmp_path / name), "--images",
                     str(tmp_path / "crops"), "--output", str(tmp_path / "f.npz")])  # fmt: skip
        assert code == 2
        one_error_line(
            capsys.readouterr().err,
            f"weights file {str(tmp_path / name)!r} is not a checkpoint: it is {what} (",
        )
    # real checkpoints, pickled code and corrupt files keep their own messages
    from lagnet.checkpoint import _describe_non_checkpoint

    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert _describe_non_checkpoint(tmp_path / "ok.pth") is None
    assert _describe_non_checkpoint(tmp_path / "legacy.pth") is None
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:100])
    assert _describe_non_checkpoint(tmp_path / "cut.pth") is None


def test_missing_keys_show_five_and_a_count() -> None:
    from lagnet.model import few_keys, load_checked

    model = build_lagnet(8, backbone="resnet18", num_attentions=4)
    state = model.state_dict()
    dropped = sorted(k for k in state if k.startswith("drop_head."))
    assert len(dropped) == 12
    kept = {k: v for k, v in state.items() if k not in dropped}
    with pytest.raises(ValueError) as info:
        load_checked(model, kept, source="x.pth")
    assert str(info.value) == (
        "cannot load x.pth into LAGNet: missing keys: ['drop_head.bottleneck.bias', "
        "'drop_head.bottleneck.num_batches_tracked', 'drop_head.bottleneck.running_mean', "
        "'drop_head.bottleneck.running_var', 'drop_head.bottleneck.weight'] (and 7 more)"
    )
    assert few_keys(["a", "b"]) == "['a', 'b']"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("variant", "Paper", "(model_config): unknown variant 'Paper' (key 'variant')"),
        ("num_attentions", "four", ": num_attentions must be an int, got str ('four')"),
    ],
)
def test_bad_model_config_in_a_checkpoint_names_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str, value: str, message: str
) -> None:
    from lagnet.checkpoint import save_checkpoint

    model = build_lagnet(8, backbone="resnet18", num_attentions=4)
    config = {"num_classes": 8, "backbone": "resnet18", "variant": "paper",
              "num_attentions": 4, "height": 64, "width": 32, key: value}  # fmt: skip
    path = tmp_path / "best.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": config}, path)
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "a.png").write_bytes(_png_bytes())
    code = main(["embed", "--weights", str(path), "--images", str(tmp_path / "crops"),
                 "--output", str(tmp_path / "f.npz")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err
    one_error_line(err, "")


# --- dataset file names and image files --------------------------------------------------------


def test_pattern_capturing_a_non_integer_shows_the_value_and_the_file(tmp_path: Path) -> None:
    from lagnet.data import ReIDFolder

    for split in ("train", "query", "gallery"):
        (tmp_path / split).mkdir()
        for name in ("0001_cA_0.png", "abc_c1_0.png", "0002_c1_0.png"):
            (tmp_path / split / name).write_bytes(_png_bytes())
    with pytest.raises(ValueError) as info:
        ReIDFolder(tmp_path, train_dir="train", query_dir="query", gallery_dir="gallery",
                   pattern=r"(?P<pid>\w+)_c(?P<camid>\w)_.*")  # fmt: skip
    assert str(info.value) == (
        f"ReIDFolder: 2 file names in the train split ({str(tmp_path / 'train')!r}) match the "
        "pattern, but a captured pid or camid is not an integer: '0001_cA_0.png' (camid "
        "captured 'A'), 'abc_c1_0.png' (pid captured 'abc'); the groups must capture digits "
        r"only, e.g. (?P<pid>\d+) and (?P<camid>\d+)"
    )
    with pytest.raises(ValueError, match=r"'abc_c1_0.png' \(pid captured nothing\)"):
        ReIDFolder(tmp_path, train_dir="train", query_dir="query", gallery_dir="gallery",
                   pattern=r"(?:(?P<pid>\d+)|abc)_c(?P<camid>\w)_.*")  # fmt: skip


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    from lagnet.data import read_image

    values = np.array([[0, 128, 129, 257], [65535, 65407, 1000, 30000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"  # a real 16-bit file
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.mode == "RGB"
    expected = np.array([[0, 0, 1, 1], [255, 255, 4, 117]], dtype=np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
    # a realistic 16-bit crop keeps its contrast (it was 99.7 % white when clipped)
    ramp = (np.arange(64 * 32).reshape(64, 32) * 31).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    gray = np.asarray(read_image(tmp_path / "ramp.png"))[..., 0]
    assert (gray == 255).mean() < 0.01 and gray.min() == 0


def test_images_without_a_known_range_are_refused_by_name(tmp_path: Path) -> None:
    from PIL import Image

    from lagnet.data import read_image

    Image.fromarray(np.ones((2, 2), dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(OSError) as info:
        read_image(tmp_path / "f.tiff")
    assert str(info.value) == (
        f"cannot read image {str(tmp_path / 'f.tiff')!r}: floating-point pixels (mode 'F') have "
        "no known range; save it as an 8-bit or 16-bit image"
    )
    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)).save(tmp_path / "i.tiff")
    with pytest.raises(OSError, match=r"\(mode 'I'\) range -5..70000, not 16-bit 0..65535"):
        read_image(tmp_path / "i.tiff")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from PIL import Image

    from lagnet.data import read_image

    pixels = (np.arange(8, dtype=np.uint8).reshape(2, 4) * 30)[..., None].repeat(3, axis=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write
    Image.fromarray(pixels).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    upright = np.asarray(read_image(tmp_path / "sideways.png"))
    np.testing.assert_array_equal(upright, np.rot90(pixels, k=-1))  # clockwise
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "plain.png")), pixels)


@pytest.mark.slow
def test_lagnet_train_with_a_huge_lr_stops_as_a_non_finite_loss(
    capsys: pytest.CaptureFixture[str], data_root: Path, tmp_path: Path
) -> None:
    code = main(["train", "--preset", "tiny", "--output", str(tmp_path / "run"), "--root",
                 str(data_root), "--no-progress", "--lr", "1e30"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("lagnet: error: loss became nan at epoch 1, batch 2; stopping"), err
    assert "attention_maps" not in err and "Traceback" not in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_nan_input_image_is_named_at_the_read_back() -> None:
    model = small().cuda()
    criterion = LAGNetLoss(5, model.attention_dim).cuda()
    step = TrainStep(model, criterion, torch.optim.SGD(model.parameters(), lr=1e-4))
    bad = images(1)
    bad[1, 0, 0, 0] = float("nan")
    batches = [(images(0), LABELS), (bad, LABELS), (images(2), LABELS)]
    with pytest.raises(ValueError) as info:
        train_one_epoch(step, batches, epoch=2, log_every=10, progress=False)
    assert str(info.value).startswith("epoch 2, batch 1: the input images hold NaN or infinite")


def test_k1_without_rerank_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["evaluate", "--weights", str(tmp_path / "w.pth"), "--dataset", "synthetic",
                 "--root", str(tmp_path), "--k1", "5"])  # fmt: skip
    assert code == 2
    one_error_line(capsys.readouterr().err, "--k1 set the re-ranking: add --rerank")
