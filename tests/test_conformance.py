"""variant="reference" against the numbers produced by the released LAG-Net code.

Exactness is tested in float64: every recorded output of the float64 set at ``rtol=1e-7,
atol=1e-9``, on the CPU and on CUDA. A failure there is a semantic difference, not rounding
(measured on a 2-core x86-64 CPU, torch 2.14.1: the largest relative difference of any output
is 1.1e-11).

The float32 set is kept for what float32 users see, but its tolerances are derived from the
measured float32-vs-float64 error of each computation, not chosen to pass. The comparison is
lagnet float32 against the released code's float32 numbers, so it has to absorb two float32
errors: the vectors' own (``|v32 - v64|``, fixed, measured once from the two files) and that of
the machine running the test (``|l32 - v64|``: measured here with 1 and 2 threads; an AMD EPYC
CPU reported up to 7e-3 on the train-mode reductions, see issue 16). Largest absolute errors
per output, measured on a 2-core x86-64 CPU with torch 2.14.1 (``l32``: lagnet float32, ``v32``
/ ``v64``: the vectors; lagnet float64 equals ``v64`` to 1e-11):

==============================  ========  =======================  ========  ========
output                          max |v|   l32 - v64 (1 / 2 thr.)   v32 - v64 l32 - v32
==============================  ========  =======================  ========  ========
embedding                       296       1.2e-4 / 1.2e-4          9.6e-5    1.2e-4
flip_tta_normalized             0.16      6.0e-8 / 5.2e-8          6.0e-8    6.0e-8
attention_features_first64      0.0059    1.5e-7 / 1.5e-7          1.4e-7    1.1e-7
attention_features_block_norms  0.21      7.7e-7 / 8.0e-7          6.8e-7    7.3e-7
attention_features_sum          221       5.8e-5 / 4.7e-5          6.2e-5    3.1e-5
triplet_features (4)            2.3       6.4e-3 / 7.3e-3          6.7e-3    3.8e-3
logits_first16 (6 heads)        2.9       1.3e-3 / 1.4e-3          1.2e-3    9.8e-4
cross_entropy (6 heads)         7.1       2.5e-4 / 2.9e-4          2.8e-4    1.8e-4
triplet_margin_1.2 (4)          1.9       3.7e-4 / 3.8e-4          3.9e-4    2.4e-4
==============================  ========  =======================  ========  ========

The eval outputs and the attention features are well conditioned (running statistics, or the
backbone's batch norms over 4 x H x W positions per channel): the bound ``|l32 - v64| + |v32 -
v64|`` stays 4.5x or more below the original ``rtol=1e-4, atol=1e-3`` (the embedding: 2.2e-4
against at least 1e-3), which they keep.

Everything that passes through the heads' batch norm in training mode (the triplet features,
the logits and the losses) is ill-conditioned by nature: the statistics are taken over only 4
samples, so a channel whose 4 values nearly coincide divides float32 rounding by a tiny standard
deviation. The first release's ``rtol=1e-4, atol=1e-3`` fails on the CPU above with one
thread (``global_reduced``, ``part_reduced``, ``part_bn``: up to 2.8e-3), as on the AMD EPYC.
There the float32 check keeps only a bound for what float32 users see (the vectors' own error +
2 x the worst machine error known) and exactness is the float64 test's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conformance_utils import (
    OUTPUT_NAMES,
    VECTORS_FLOAT32,
    VECTORS_FLOAT64,
    exact_float32,
    expected_outputs,
    load_vectors,
    rebuild_reference_state_dict,
    reference_outputs,
)

from lagnet import LAGNet, from_reference

EXACT = {"rtol": 1e-7, "atol": 1e-9}

# float32 tolerances by the kind of computation (see the module docstring for the measurements).
# Well conditioned: the original tolerance, >= 4x above the largest |l32 - v32| bound measured
# (|l32 - v64| + |v32 - v64| = 2.2e-4 for the embedding, against atol 1e-3 + rtol * |v|).
WELL_CONDITIONED = {"rtol": 1e-4, "atol": 1e-3}
# Train-mode head outputs pass through batch norm over 4 samples; the bound of each is the
# vectors' own error + 2 x the worst machine error known. The AMD EPYC run's 7e-3 on the
# features is within the 7.3e-3 measured here, so the figures measured here stand for both.
# Features: 6.7e-3 + 2 x 7.3e-3 = 2.13e-2.
BATCH_NORM_FEATURES = {"rtol": 0.0, "atol": 2.2e-2}
# Logits (linear in those features, errors 5x lower): 1.2e-3 + 2 x 1.4e-3 = 4.0e-3.
BATCH_NORM_LOGITS = {"rtol": 0.0, "atol": 4.1e-3}
# Losses of those features and logits (scalars): 3.9e-4 + 2 x 3.8e-4 = 1.15e-3.
BATCH_NORM_LOSSES = {"rtol": 0.0, "atol": 1.2e-3}


def float32_tolerance(name: str) -> dict[str, float]:
    if name.startswith("triplet_features/"):
        return BATCH_NORM_FEATURES
    if name.startswith("logits_first16/"):
        return BATCH_NORM_LOGITS
    if name.startswith(("cross_entropy/", "triplet_margin_1.2/")):
        return BATCH_NORM_LOSSES
    return WELL_CONDITIONED


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
    return load_vectors(VECTORS_FLOAT32)


@pytest.fixture(scope="module")
def vectors64() -> dict[str, Any]:
    return load_vectors(VECTORS_FLOAT64)


@pytest.fixture(scope="module")
def reference_model() -> LAGNet:
    """The float32 model of the recipe, built once per module. Tests may switch its mode but
    never run it in training mode: ``reference_outputs`` works on a copy."""
    return from_reference(rebuild_reference_state_dict())


@pytest.fixture(scope="module")
def outputs32(reference_model: LAGNet, vectors: dict[str, Any]) -> dict[str, torch.Tensor]:
    return reference_outputs(reference_model, vectors)


@pytest.fixture(scope="module")
def model64(reference_model: LAGNet) -> LAGNet:
    """The float32 recipe weights cast with ``.double()``, as the float64 set was made."""
    return copy.deepcopy(reference_model).double()


@pytest.fixture(scope="module")
def outputs64(model64: LAGNet, vectors64: dict[str, Any]) -> dict[str, torch.Tensor]:
    return reference_outputs(model64, vectors64)


def test_model_geometry(reference_model: LAGNet, vectors: dict[str, Any]) -> None:
    assert reference_model.variant == "reference"
    assert reference_model.num_classes == vectors["num_classes"] == 751
    assert reference_model.num_attentions == vectors["num_attentions"]
    assert reference_model.feature_dim == 3584
    assert reference_model.attention_dim == vectors["feature_matrix_shape"][1] == 49152


def test_the_two_sets_share_their_settings(
    vectors: dict[str, Any], vectors64: dict[str, Any]
) -> None:
    assert vectors64["dtype"] == "float64"
    assert "dtype" not in vectors
    settings = ("salt", "height", "width", "batch", "input_seed", "num_classes")
    assert {k: vectors64[k] for k in settings} == {k: vectors[k] for k in settings}
    assert vectors64["train_mode"]["labels"] == vectors["train_mode"]["labels"] == [0, 0, 1, 1]


def test_every_output_is_recorded_in_both_sets(
    vectors: dict[str, Any], vectors64: dict[str, Any]
) -> None:
    e32, e64 = expected_outputs(vectors), expected_outputs(vectors64)
    assert len(OUTPUT_NAMES) == 25
    assert {n: e64[n].shape for n in OUTPUT_NAMES} == {n: e32[n].shape for n in OUTPUT_NAMES}
    assert e32["embedding"].shape == (2, 3584)
    assert e32["triplet_features/part_bn"].shape == (4, 512)
    assert e64["embedding"].dtype == torch.float64


@pytest.mark.slow
@pytest.mark.parametrize("name", OUTPUT_NAMES)
def test_float64_output_is_exact(
    outputs64: dict[str, torch.Tensor], vectors64: dict[str, Any], name: str
) -> None:
    got = outputs64[name]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected_outputs(vectors64)[name], **EXACT)


@pytest.mark.parametrize("name", OUTPUT_NAMES)
def test_float32_output(
    outputs32: dict[str, torch.Tensor], vectors: dict[str, Any], name: str
) -> None:
    got = outputs32[name]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_outputs(vectors)[name], **float32_tolerance(name))


def test_train_triplet_feature_order(reference_model: LAGNet) -> None:
    x = torch.randn(2, 3, 96, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # eval mode: the running statistics stay as they are
        out = reference_model.eval().forward_train(x)
    assert list(out.triplet_features) == [
        "global_reduced",
        "part_reduced",
        "la_reduced",
        "drop_reduced",
        "part_bn",
    ]


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float64_outputs_on_cuda_are_exact(model64: LAGNet, vectors64: dict[str, Any]) -> None:
    got = reference_outputs(model64, vectors64, device="cuda")
    want = expected_outputs(vectors64)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(got[name], want[name], **EXACT, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float32_eval_outputs_on_cuda(reference_model: LAGNet, vectors: dict[str, Any]) -> None:
    # The eval outputs only, as before issue 16: cuDNN's float32 convolutions were not measured
    # against float64 in training mode, so no tolerance for those can be derived yet (their
    # exactness on CUDA is the float64 test's).
    got = reference_outputs(reference_model, vectors, device="cuda")
    want = expected_outputs(vectors)
    for name in ("embedding", "flip_tta_normalized"):
        torch.testing.assert_close(got[name], want[name], **WELL_CONDITIONED, msg=name)
