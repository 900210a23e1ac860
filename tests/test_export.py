"""ONNX and torch.export of the eval embedding model: parity with eager PyTorch, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lagnet import LAGNet, build_lagnet
from lagnet.data import IMAGENET_MEAN, IMAGENET_STD
from lagnet.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    EmbeddingExportModule,
    export_program,
    to_onnx,
)

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: lagnet[onnx]")
ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra: lagnet[onnx]")

NUM_CLASSES = 6

# (variant, include_normalization, input size): both variants, with and without normalisation
# (an ONNX export takes about 10 s here, so two cases cover the four settings). The heights give
# stride-16 maps of 4 and 8 rows, which the 3 stripes do not divide.
CASES = [
    ("paper", False, (64, 32)),
    ("reference", True, (128, 64)),
]


def tiny_model(variant: str, seed: int = 0) -> LAGNet:
    torch.manual_seed(seed)
    model = build_lagnet(NUM_CLASSES, backbone="resnet18", variant=variant, num_attentions=8)  # type: ignore[arg-type]
    # non-trivial batch-norm statistics, so that eval mode is not an identity
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def assert_close_to_scale(
    actual: np.ndarray, expected: torch.Tensor, relative: float = 1e-4
) -> None:
    exp = expected.detach().float().numpy()
    assert actual.shape == exp.shape
    scale = float(np.abs(exp).max())
    err = float(np.abs(actual - exp).max())
    assert scale > 0
    assert err <= relative * scale, f"max abs diff {err} > {relative} * {scale}"


class TinyEmbedder(torch.nn.Module):
    """conv -> relu -> spatial mean -> linear: a small (B, 3, H, W) -> (B, 5) model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny models: one intra-op thread is fastest and avoids oversubscribing a shared CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_model() -> LAGNet:
    return tiny_model("paper")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-norm{int(c[1])}")
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LAGNet, Path, bool, tuple[int, int]]:
    variant, norm, size = request.param
    model = tiny_model(variant)
    path = tmp_path_factory.mktemp("onnx") / f"{variant}.onnx"
    out = to_onnx(model, path, input_size=size, include_normalization=norm)
    assert out == path
    return model, path, norm, size


def test_onnx_matches_eager_for_dynamic_batch(
    exported: tuple[LAGNet, Path, bool, tuple[int, int]],
) -> None:
    model, path, norm, (h, w) = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 5):
        images = torch.rand(batch, 3, h, w, generator=generator)  # RGB in [0, 1]
        onnx_in = images if norm else normalise(images)
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: onnx_in.numpy()})
        with torch.no_grad():
            expected = model(normalise(images))
        assert isinstance(expected, torch.Tensor)
        assert expected.shape == (batch, model.feature_dim)
        assert_close_to_scale(got, expected)


def test_onnx_graph_interface(exported: tuple[LAGNet, Path, bool, tuple[int, int]]) -> None:
    model, path, norm, (h, w) = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert inp.name == "images" and out.name == "output"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 3, h, w]
    assert out_dims == ["batch", model.feature_dim]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["input_size"] == f"{h}x{w}"
    assert props["embedding_dim"] == str(model.feature_dim)
    assert props["input_range"] == ("[0, 1]" if norm else "ImageNet-normalised")
    # written atomically: no temporary file left next to it
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_onnx_static_batch_at_the_exporters_opset(eval_model: LAGNet, tmp_path: Path) -> None:
    path = to_onnx(
        eval_model, tmp_path / "static.onnx", input_size=(64, 32), dynamic_batch=False, opset=18
    )
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 32]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(1, 3, 64, 32)
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        assert_close_to_scale(got, eval_model.embed(images))


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_torch_export_matches_eager(variant: str) -> None:
    model = tiny_model(variant, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = export_program(model, input_size=(64, 32))
    assert isinstance(program, torch.export.ExportedProgram)
    assert not model.training
    for key, value in model.state_dict().items():  # exporting leaves the model alone
        assert torch.equal(value, before[key]), key
    exported_module = program.module()
    for batch in (1, 4):
        images = torch.randn(batch, 3, 64, 32)
        with torch.no_grad():
            got = exported_module(images)
            expected = model(images)
        assert isinstance(expected, torch.Tensor)
        assert_close_to_scale(got.numpy(), expected)
    # the stripes are computed without adaptive max pooling, so the graph exports anywhere
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("adaptive_max_pool" in t for t in targets), targets


def test_torch_export_with_normalisation_and_static_batch() -> None:
    model = tiny_model("reference", seed=4)
    program = export_program(
        model, input_size=(64, 32), dynamic_batch=False, include_normalization=True
    )
    images = torch.rand(1, 3, 64, 32)
    with torch.no_grad():
        got = program.module()(images)
        expected = model(normalise(images))
    assert isinstance(expected, torch.Tensor)
    assert_close_to_scale(got.numpy(), expected)
    with pytest.raises(Exception):  # noqa: B017 - the batch size is fixed at 1
        program.module()(torch.rand(2, 3, 64, 32))


def test_embedding_export_module_normalises(eval_model: LAGNet) -> None:
    model = eval_model
    wrapper = EmbeddingExportModule(model, include_normalization=True).eval()
    images = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(wrapper(images), model.embed(normalise(images)))
    with pytest.raises(ValueError, match="3 values"):
        EmbeddingExportModule(model, mean=(0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_training_mode_is_refused(eval_model: LAGNet, tmp_path: Path) -> None:
    eval_model.train()
    try:
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
            to_onnx(eval_model, tmp_path / "m.onnx", input_size=(64, 32))
        with pytest.raises(ValueError, match=r"model\.eval\(\)"):
            export_program(eval_model, input_size=(64, 32))
        # one submodule left in training mode is enough to refuse, and it is named
        eval_model.eval()
        eval_model.drop.train()
        with pytest.raises(ValueError, match="drop"):
            export_program(eval_model, input_size=(64, 32))
    finally:
        eval_model.eval()
    assert not (tmp_path / "m.onnx").exists()


def test_missing_output_folder_is_named(eval_model: LAGNet, tmp_path: Path) -> None:
    folder = tmp_path / "no" / "such-folder"
    with pytest.raises(FileNotFoundError, match="such-folder"):
        to_onnx(eval_model, folder / "m.onnx", input_size=(64, 32))
    with pytest.raises(IsADirectoryError, match="folder"):
        to_onnx(eval_model, tmp_path, input_size=(64, 32))


@pytest.mark.parametrize("size", [(16, 64), (64, 31), (8, 8)])
def test_too_small_input_size_is_named(
    eval_model: LAGNet, tmp_path: Path, size: tuple[int, int]
) -> None:
    pattern = f"{size[0]}x{size[1]}"
    with pytest.raises(ValueError, match=pattern):
        to_onnx(eval_model, tmp_path / "m.onnx", input_size=size)
    with pytest.raises(ValueError, match=pattern):
        export_program(eval_model, input_size=size)


@pytest.mark.parametrize("size", [(64,), (64.0, 32), "64x32", (64, 32, 3), (True, 32)])
def test_malformed_input_size(eval_model: LAGNet, tmp_path: Path, size: object) -> None:
    with pytest.raises(TypeError, match="input_size"):
        to_onnx(eval_model, tmp_path / "m.onnx", input_size=size)  # type: ignore[arg-type]


def test_bad_arguments(eval_model: LAGNet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset must be between 13 and .* got 9"):
        to_onnx(eval_model, tmp_path / "m.onnx", input_size=(64, 32), opset=9)
    with pytest.raises(TypeError, match="opset must be an int"):
        to_onnx(eval_model, tmp_path / "m.onnx", input_size=(64, 32), opset="17")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_onnx("model.pth", tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dynamic_batch"):
        export_program(eval_model, input_size=(64, 32), dynamic_batch="yes")  # type: ignore[arg-type]


def test_model_that_rejects_the_size_gets_a_value_error(tmp_path: Path) -> None:
    class NeedsSquare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] != x.shape[3]:
                raise ValueError(f"square images only, got {tuple(x.shape)}")
            return self.linear(x.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="cannot take input_size 64x32"):
        export_program(NeedsSquare().eval(), input_size=(64, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_a_float32_interface(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    model = TinyEmbedder().to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = export_program(model, input_size=(32, 32))
    images = torch.rand(3, 3, 32, 32)
    got = program.module()(images)
    assert got.dtype == torch.float32
    with torch.no_grad():
        expected = model(images.to(dtype)).float()
    torch.testing.assert_close(got, expected)
    for key, value in model.state_dict().items():  # the model keeps its dtype
        assert value.dtype == dtype and torch.equal(value, before[key]), key


def test_half_precision_model_exports_float32_onnx_input(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = TinyEmbedder().half().eval()
    path = to_onnx(model, tmp_path / "fp16.onnx", input_size=(32, 32))
    proto = onnx.load(str(path))
    float32 = onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.elem_type == float32
    assert proto.graph.output[0].type.tensor_type.elem_type == float32
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 32, 32)
    (got,) = session.run(None, {INPUT_NAME: images.numpy()})
    assert got.dtype == np.float32
    with torch.no_grad():
        expected = model(images.half())
    assert_close_to_scale(got, expected, relative=5e-3)  # float16 arithmetic in both


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x.mean(dim=(2, 3)))
        return -self.fc(x.mean(dim=(2, 3)))


def test_data_dependent_control_flow_gets_a_lagnet_error(tmp_path: Path) -> None:
    pattern = (
        r"cannot be exported as one static graph: its forward takes a Python branch on tensor "
        r"values \(at File .*test_export.py\", line \d+, in forward: if x.sum\(\) > 0:\)"
    )
    with pytest.raises(ValueError, match=pattern):
        export_program(Branchy().eval(), input_size=(32, 32))
    with pytest.raises(ValueError, match="Python branch on tensor values"):
        to_onnx(Branchy().eval(), tmp_path / "branchy.onnx", input_size=(32, 32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["max+avg", "max"])
def test_stripe_pool_alone_exports_to_onnx_for_a_height_it_does_not_divide(
    mode: str, tmp_path: Path
) -> None:
    from lagnet.layers import StripePool

    model = torch.nn.Sequential(StripePool(3, mode), torch.nn.Flatten()).eval()  # type: ignore[arg-type]
    path = to_onnx(model, tmp_path / "stripes.onnx", input_size=(35, 33))  # 35 rows, 3 stripes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(4, 3, 35, 33)
    (got,) = session.run(None, {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert_close_to_scale(got, expected, relative=1e-6)


def test_export_module_compute_dtype_is_checked() -> None:
    with pytest.raises(TypeError, match="compute_dtype must be a floating-point torch.dtype"):
        EmbeddingExportModule(TinyEmbedder(), compute_dtype=torch.int8)
    wrapper = EmbeddingExportModule(TinyEmbedder().double(), compute_dtype=torch.float64)
    assert "compute_dtype=torch.float64" in repr(wrapper)
    assert wrapper(torch.rand(1, 3, 8, 8)).dtype == torch.float32


def test_missing_onnx_gives_install_hint(
    eval_model: LAGNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"pip install \"lagnet\[onnx\]\""):
        to_onnx(eval_model, tmp_path / "m.onnx", input_size=(64, 32))


def test_too_old_torch_is_named_before_any_work(
    eval_model: LAGNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(RuntimeError, match=r"to_onnx needs torch >= 2\.6.*torch 2\.5\.1\+cpu"):
        to_onnx(eval_model, tmp_path / "m.onnx", input_size=(64, 32))
    assert list(tmp_path.iterdir()) == []
