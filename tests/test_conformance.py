"""variant="reference" against the numbers produced by the released LAG-Net code."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conformance_utils import (
    exact_float32,
    load_vectors,
    rebuild_reference_state_dict,
    reference_inputs,
)

from lagnet import LAGNet, LAGNetOutput, from_reference
from lagnet.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy

TOL = {"rtol": 1e-4, "atol": 1e-3}


@pytest.fixture(autouse=True, scope="module")
def tf32_off() -> Iterator[None]:
    """TF32 off for this module (cuDNN enables it by default on Ampere and newer)."""
    with exact_float32():
        yield


def test_tf32_is_pinned_off() -> None:
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False


def test_exact_float32_restores_the_settings() -> None:
    outer = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(KeyError), exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            raise KeyError("an error inside")
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = outer


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return load_vectors()


@pytest.fixture(scope="module")
def reference_model() -> LAGNet:
    return from_reference(rebuild_reference_state_dict())


def expected(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture(scope="module")
def eval_embeddings(
    reference_model: LAGNet, vectors: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    x, _, _ = reference_inputs(vectors)
    model = reference_model.eval()
    with torch.no_grad():
        return model.embed(x), model.embed(x.flip(-1))


@pytest.fixture(scope="module")
def train_output(reference_model: LAGNet, vectors: dict[str, Any]) -> LAGNetOutput:
    _, xt, _ = reference_inputs(vectors)
    # A copy: a training-mode pass updates the batch-norm running statistics, which would leak
    # into the eval-mode tests that share the module-scoped model.
    model = copy.deepcopy(reference_model).train()
    with torch.no_grad():
        return model.forward_train(xt)


def test_model_geometry(reference_model: LAGNet, vectors: dict[str, Any]) -> None:
    assert reference_model.variant == "reference"
    assert reference_model.num_classes == vectors["num_classes"] == 751
    assert reference_model.num_attentions == vectors["num_attentions"]
    assert reference_model.feature_dim == 3584
    assert reference_model.attention_dim == vectors["feature_matrix_shape"][1] == 49152


def test_eval_embedding(
    eval_embeddings: tuple[torch.Tensor, torch.Tensor], vectors: dict[str, Any]
) -> None:
    emb, _ = eval_embeddings
    assert emb.shape == (2, 3584)
    torch.testing.assert_close(emb, expected(vectors["embedding"]), **TOL)


def test_flip_tta_normalized(
    eval_embeddings: tuple[torch.Tensor, torch.Tensor], vectors: dict[str, Any]
) -> None:
    emb, emb_flip = eval_embeddings
    tta = F.normalize(emb + emb_flip, dim=1)
    torch.testing.assert_close(tta, expected(vectors["flip_tta_normalized"]), **TOL)


def test_train_attention_features(train_output: LAGNetOutput, vectors: dict[str, Any]) -> None:
    tm = vectors["train_mode"]
    af = train_output.attention_features
    assert af.shape == (4, 24 * 2048)
    torch.testing.assert_close(af[:, :64], expected(tm["attention_features_first64"]), **TOL)
    norms = af.view(4, 24, 2048).norm(dim=2)
    torch.testing.assert_close(norms, expected(tm["attention_features_block_norms"]), **TOL)
    torch.testing.assert_close(af.sum(dim=1), expected(tm["attention_features_sum"]), **TOL)


@pytest.mark.parametrize("name", ["global_reduced", "part_reduced", "la_reduced", "part_bn"])
def test_train_triplet_features(
    train_output: LAGNetOutput, vectors: dict[str, Any], name: str
) -> None:
    want = expected(vectors["train_mode"]["triplet_features"][name])
    torch.testing.assert_close(train_output.triplet_features[name], want, **TOL)


def test_train_triplet_feature_order(train_output: LAGNetOutput) -> None:
    assert list(train_output.triplet_features) == [
        "global_reduced",
        "part_reduced",
        "la_reduced",
        "drop_reduced",
        "part_bn",
    ]


@pytest.mark.parametrize("head", ["la", "global", "part", "part0", "part1", "part2"])
def test_train_logits(train_output: LAGNetOutput, vectors: dict[str, Any], head: str) -> None:
    want = expected(vectors["train_mode"]["logits_first16"][head])
    torch.testing.assert_close(train_output.logits[head][:, :16], want, **TOL)


@pytest.mark.parametrize("head", ["la", "global", "part", "part0", "part1", "part2"])
def test_train_cross_entropy(
    train_output: LAGNetOutput, vectors: dict[str, Any], head: str
) -> None:
    labels = torch.tensor(vectors["train_mode"]["labels"])
    got = LabelSmoothingCrossEntropy()(train_output.logits[head], labels)
    want = torch.tensor(vectors["train_mode"]["cross_entropy"][head])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", ["global_reduced", "part_reduced", "la_reduced", "part_bn"])
def test_train_triplet_loss(train_output: LAGNetOutput, vectors: dict[str, Any], name: str) -> None:
    labels = torch.tensor(vectors["train_mode"]["labels"])
    got = BatchHardTripletLoss(margin=1.2)(train_output.triplet_features[name], labels)
    want = torch.tensor(vectors["train_mode"]["triplet_margin_1.2"][name])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_embedding_on_cuda(reference_model: LAGNet, vectors: dict[str, Any]) -> None:
    x, _, _ = reference_inputs(vectors)
    model = reference_model.cuda().eval()
    try:
        with torch.no_grad():
            emb = model.embed(x.cuda()).cpu()
    finally:
        reference_model.cpu()
    torch.testing.assert_close(emb, expected(vectors["embedding"]), **TOL)
