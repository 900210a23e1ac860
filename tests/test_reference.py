from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conformance_utils import load_keys, rebuild_reference_state_dict

from lagnet import LAGNet, from_reference
from lagnet.reference import IGNORED_PREFIXES, reference_key_to_lagnet


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return rebuild_reference_state_dict()


@pytest.fixture(scope="module")
def model(state: dict[str, torch.Tensor]) -> LAGNet:
    return from_reference(state)


def test_key_mapping_is_a_bijection_onto_the_model(model: LAGNet) -> None:
    keys = [e["key"] for e in load_keys()]
    assert len(keys) == 1072
    mapped = [reference_key_to_lagnet(k) for k in keys]
    kept = [m for m in mapped if m is not None]
    ignored = [k for k, m in zip(keys, mapped, strict=True) if m is None]
    assert all(k.startswith(IGNORED_PREFIXES) for k in ignored)
    assert any(k.startswith("test.") for k in ignored)
    assert any(k.startswith("channel_attention.") for k in ignored)
    assert len(set(kept)) == len(kept)
    assert set(kept) == set(model.state_dict())


def test_loaded_values(model: LAGNet, state: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(model.las.conv.weight, state["attentions.conv.weight"])
    torch.testing.assert_close(
        model.drop_head.bottleneck.running_var, state["classifier_d.fc_block2.0.running_var"]
    )
    torch.testing.assert_close(
        model.part_head.stripe_heads[2].classifier.weight,
        state["classifier_p2_ps.classifier.0.weight"],
    )
    assert model.variant == "reference" and model.num_classes == 751


def test_file_and_module_prefix(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    small = {k: v for k, v in state.items()}
    path = tmp_path / "ref.pth"
    torch.save({"module." + k: v for k, v in small.items()}, path)
    m = from_reference(path, num_classes=751)
    torch.testing.assert_close(m.stem[0].weight, state["backbone.0.weight"])


def test_errors(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    missing = dict(state)
    missing.pop("la_stream.1.2.bn3.running_mean")
    with pytest.raises(ValueError, match=r"missing keys: \['la_branch.1.2.bn3.running_mean'\]"):
        from_reference(missing)
    extra = dict(state)
    extra["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['bogus.weight'\]"):
        from_reference(extra)
    bad = dict(state)
    bad["attentions.bn.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"las.bn.weight: expected \(2048,\), got \(3,\)"):
        from_reference(bad)
    with pytest.raises(
        ValueError,
        match="num_classes=702 does not match the checkpoint's classifiers \\(751 classes\\)",
    ):
        from_reference(state, num_classes=702)
    as_lists = {k: v.tolist() for k, v in list(state.items())[:3]}
    first = next(iter(as_lists))
    with pytest.raises(
        TypeError,
        match=(
            rf"the reference state dict must map parameter names \(str\) to tensors, but "
            rf"'{first}' holds a list \(and 2 more entries\)"
        ),
    ):
        from_reference(as_lists)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="checkpoint must be a state dict or a file path, got int"):
        from_reference(3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="reference checkpoint file not found"):
        from_reference(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="refusing to load reference checkpoint"):
        from_reference(evil)
