from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from lagnet import LAGNet, LAGNetLoss, LAGNetOutput, build_lagnet
from lagnet.model import HEAD_NAMES


def small(variant: str = "paper", backbone: str = "resnet18", **kw: object) -> LAGNet:
    torch.manual_seed(0)
    return build_lagnet(5, backbone=backbone, variant=variant, num_attentions=8, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_train_output_structure(variant: str) -> None:
    model = small(variant).train()
    out = model(torch.randn(4, 3, 64, 32))
    assert isinstance(out, LAGNetOutput)
    assert out.embedding.shape == (4, 7 * 512)
    assert list(out.logits) == list(HEAD_NAMES)
    assert all(v.shape == (4, 5) for v in out.logits.values())
    fifth = "part_bn" if variant == "reference" else "stripes_reduced"
    assert list(out.triplet_features) == [
        "global_reduced",
        "part_reduced",
        "la_reduced",
        "drop_reduced",
        fifth,
    ]
    assert out.triplet_features[fifth].shape == (4, 512 if variant == "reference" else 768)
    assert out.attention_features.shape == (4, 8 * 512)
    assert out.attention_maps.shape == (4, 8, 4, 2)


@pytest.mark.parametrize(
    ("backbone", "size", "channels"),
    [("resnet18", (64, 32), 512), ("resnet34", (70, 45), 512), ("resnet50", (96, 40), 2048)],
)
def test_eval_embedding_shapes(backbone: str, size: tuple[int, int], channels: int) -> None:
    model = small(backbone=backbone).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        emb = model(torch.randn(2, 3, *size))
    assert isinstance(emb, torch.Tensor)
    assert emb.shape == (2, 3584) == (2, model.feature_dim)


def test_default_resnet50_embedding_is_3584() -> None:
    model = build_lagnet(751).eval()
    assert model.attention_dim == 24 * 2048
    with torch.no_grad():
        assert model.embed(torch.randn(1, 3, 384, 128)).shape == (1, 3584)


def test_branch_strides() -> None:
    model = small()
    shared = model.stem(torch.randn(1, 3, 128, 64))
    assert shared.shape[2:] == (8, 4)
    assert model.global_branch(shared).shape[2:] == (4, 2)
    assert model.part_branch(shared).shape[2:] == (8, 4)
    assert model.la_branch(shared).shape[2:] == (8, 4)
    # stride-1 copies keep the same weights as the strided layer4
    torch.testing.assert_close(
        model.part_branch[1][0].conv1.weight, model.global_branch[1][0].conv1.weight
    )


def test_variants_share_weight_shapes() -> None:
    a = {k: v.shape for k, v in small("paper").state_dict().items()}
    b = {k: v.shape for k, v in small("reference").state_dict().items()}
    assert a == b


def test_variants_differ_only_where_documented() -> None:
    paper, ref = small("paper").eval(), small("reference").eval()
    ref.load_state_dict(paper.state_dict())
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        ep, er = paper(x), ref(x)
    assert isinstance(ep, torch.Tensor) and isinstance(er, torch.Tensor)
    same = slice(0, 512), slice(1024, 1536), slice(1536, 2048)  # la, global, part
    for s in same:
        torch.testing.assert_close(ep[:, s], er[:, s])
    assert not torch.allclose(ep[:, 512:1024], er[:, 512:1024])  # drop pooling
    assert not torch.allclose(ep[:, 2048:], er[:, 2048:])  # stripes


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_loss_backward_reaches_every_used_parameter(variant: str) -> None:
    model = small(variant).train()
    loss_fn = LAGNetLoss(5, model.attention_dim)
    out = model(torch.randn(4, 3, 64, 32))
    total, parts = loss_fn(out, torch.tensor([0, 0, 1, 1]))
    total.backward()
    assert set(parts) == {"cross_entropy", "triplet", "center"}
    without_grad = {n for n, p in model.named_parameters() if p.grad is None}
    if variant == "paper":
        assert without_grad == set()
    else:  # the released code computes the stripe reductions but drops their outputs
        assert without_grad and all(
            n.startswith("part_head.stripe_reductions.") for n in without_grad
        )


def _drop_in_and_out(model: LAGNet, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.extend([args[0].detach(), out.detach()])

    handle = model.drop.register_forward_hook(hook)
    try:
        torch.manual_seed(seed)
        embedding = model.forward_train(x).embedding.detach()
    finally:
        handle.remove()
    return seen[0], seen[1], embedding


def test_drop_block_drops_a_seeded_region_that_another_seed_moves() -> None:
    model = small().train()
    model.eval()
    for m in model.modules():  # batch norm frozen, so only the drop block varies between runs
        m.train(m is model or m is model.drop)
    x = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    feats, out, emb = _drop_in_and_out(model, x, seed=1)
    # a position is dropped when every channel of the output is 0 although the input was not
    dropped = (out == 0).all(dim=1) & (feats != 0).any(dim=1)  # (B, h, w)
    assert dropped.flatten(1).any(dim=1).all()  # every sample loses a region...
    assert (~dropped).flatten(1).any(dim=1).all()  # ...but not all of its map
    torch.testing.assert_close(out, feats * (~dropped)[:, None], rtol=0, atol=0)
    # the same seed: the same region and embedding; another seed: another region somewhere
    _, out2, emb2 = _drop_in_and_out(model, x, seed=1)
    assert torch.equal(out2, out) and torch.equal(emb2, emb)
    _, out3, emb3 = _drop_in_and_out(model, x, seed=2)
    dropped3 = (out3 == 0).all(dim=1) & (feats != 0).any(dim=1)
    assert not torch.equal(dropped3, dropped)
    assert not torch.equal(emb3, emb)
    # with the block switched off nothing is dropped
    model.drop.eval()
    _, out4, _ = _drop_in_and_out(model, x, seed=1)
    assert torch.equal(out4, feats)


def test_channels_last_input_matches() -> None:
    model = small().eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        a = model.embed(x)
        b = model.to(memory_format=torch.channels_last).embed(
            x.contiguous(memory_format=torch.channels_last)
        )
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_eval_model() -> None:
    model = small().eval()
    x = torch.randn(2, 3, 64, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_weights_roundtrip(tmp_path: Path) -> None:
    model = small().eval()
    path = tmp_path / "lagnet.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    again = build_lagnet(5, backbone="resnet18", num_attentions=8, weights=path).eval()
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_backbone_weights_from_local_file(tmp_path: Path) -> None:
    torch.manual_seed(7)
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_lagnet(5, backbone="resnet18", num_attentions=8, backbone_weights=str(path))
    torch.testing.assert_close(model.stem[0].weight, resnet.conv1.weight)
    torch.testing.assert_close(model.la_branch[1][1].conv2.weight, resnet.layer4[1].conv2.weight)


def test_missing_backbone_weights_explains_how_to_provide(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"backbone_weights file not found.*'imagenet'.*torch hub cache.*torch.save",
    ):
        build_lagnet(5, backbone="resnet18", backbone_weights=tmp_path / "nope.pth")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    with path.open("wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load weights .*pickled code"):
        build_lagnet(5, backbone="resnet18", weights=path)


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    state = small().state_dict()
    state.pop("las.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    state["la_head.classifier.weight"] = torch.zeros(3, 512)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=(
            r"missing keys: \['las.conv.weight'\].*unexpected keys: \['extra.weight'\]"
            r".*la_head.classifier.weight: expected \(5, 512\), got \(3, 512\)"
        ),
    ):
        build_lagnet(5, backbone="resnet18", num_attentions=8, weights=path)


def test_backbone_weights_of_another_resnet_are_named(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(
        ValueError,
        match=(
            r"backbone_weights do not fit resnet18 \(were they saved from another ResNet\?\); "
            r"unexpected keys: layer1.0.bn3.bias, .*\(\+\d+ more\); shape mismatches \(file vs "
            r"model\): layer1.0.conv1.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)"
        ),
    ):
        build_lagnet(5, backbone="resnet18", backbone_weights=path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_must_match_the_model(dtype: torch.dtype) -> None:
    model = small().eval()
    with pytest.raises(
        TypeError,
        match=rf"images has dtype {dtype} but the parameters of LAGNet are torch.float32",
    ):
        model(torch.randn(2, 3, 64, 32, dtype=dtype))


def test_bfloat16_images_are_accepted_under_autocast() -> None:
    model = small().eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = model.embed(x.bfloat16())
        b = model.embed(x)
    assert a.shape == (2, 3584) and torch.isfinite(a).all()
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_build_lagnet_forwards_to_lagnet() -> None:
    import inspect

    assert list(inspect.signature(build_lagnet).parameters) == ["num_classes", "weights", "kwargs"]
    torch.manual_seed(0)
    a = build_lagnet(5, backbone="resnet18", num_attentions=8)
    torch.manual_seed(0)
    b = LAGNet(5, backbone="resnet18", num_attentions=8)
    assert repr(a) == repr(b)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_attention'"):
        build_lagnet(5, backbone="resnet18", num_attention=8)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_lagnet(5, backbone="vgg16")
    with pytest.raises(ValueError, match="unknown variant 'original'"):
        build_lagnet(5, backbone="resnet18", variant="original")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_attentions=600 must not exceed in_channels=512"):
        build_lagnet(5, backbone="resnet18", num_attentions=600)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 0"):
        build_lagnet(5, backbone="resnet18", drop_threshold=0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        build_lagnet("751", backbone="resnet18")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes from 0 to 1 positional arguments but 2"):
        build_lagnet(5, "resnet18")  # type: ignore[misc]
    model = small()
    with pytest.raises(
        ValueError,
        match="training-mode forward needs a batch of at least 2 images.*got batch size 1",
    ):
        model.train()(torch.randn(1, 3, 64, 32))
    with pytest.raises(
        ValueError, match=r"images must have 3 channels \(RGB\), got shape \(2, 1, 64, 32\)"
    ):
        model(torch.randn(2, 1, 64, 32))
    with pytest.raises(ValueError, match="images must be at least 32x32.*got 16x32"):
        model(torch.randn(2, 3, 16, 32))
    with pytest.raises(
        TypeError, match="images must be a floating-point tensor, got dtype torch.uint8"
    ):
        model(torch.zeros(2, 3, 64, 32, dtype=torch.uint8))
    with pytest.raises(
        ValueError, match=r"images must be 4-D with shape \(B, C, H, W\), got shape \(3, 64, 32\)"
    ):
        model(torch.randn(3, 64, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last_training_step() -> None:
    model = small().cuda().to(memory_format=torch.channels_last).train()
    loss_fn = LAGNetLoss(5, model.attention_dim).cuda()
    x = torch.randn(4, 3, 64, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        out = model.forward_train(x)
        total, _ = loss_fn(out, torch.tensor([0, 0, 1, 1], device="cuda"))
    total.backward()
    assert torch.isfinite(total)
    assert all(p.grad is not None for p in model.las.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        emb = model.embed(x)
    assert emb.shape == (4, 3584) and torch.isfinite(emb).all()
