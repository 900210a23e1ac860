"""The public API: a small top level, and the old top-level names forwarding with a warning."""

from __future__ import annotations

import importlib

import pytest

import lagnet


def test_top_level_is_small_and_complete() -> None:
    assert sorted(lagnet.__all__) == sorted(
        [
            "BatchAttentionDropBlock",
            "LAGNet",
            "LAGNetLoss",
            "LAGNetOutput",
            "LocalAttentionSystem",
            "MultiGranularityHead",
            "__version__",
            "build_lagnet",
            "from_pretrained",
            "from_reference",
            "save_pretrained",
        ]
    )
    for name in lagnet.__all__:
        assert hasattr(lagnet, name), name


@pytest.mark.parametrize("name", sorted(lagnet._MOVED))
def test_moved_name_warns_with_its_new_import(name: str) -> None:
    module = lagnet._MOVED[name]
    with pytest.warns(DeprecationWarning, match=rf"use `from {module} import {name}`") as record:
        value = getattr(lagnet, name)
    assert record[0].filename == __file__  # the warning points at the caller
    new_home = importlib.import_module(module)
    assert value is getattr(new_home, name)


@pytest.mark.parametrize("name", sorted(lagnet._RENAMED))
def test_renamed_name_warns_with_its_new_name(name: str) -> None:
    module, new_name = lagnet._RENAMED[name]
    with pytest.warns(DeprecationWarning, match=rf"use `from {module} import {new_name}`"):
        value = getattr(lagnet, name)
    assert value is getattr(importlib.import_module(module), new_name)


def test_from_import_of_a_moved_name_warns() -> None:
    with pytest.warns(DeprecationWarning, match="lagnet.data import PKSampler"):
        from lagnet import PKSampler  # noqa: F401


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lagnet.nonexistent  # noqa: B018


def test_the_public_names_are_documented() -> None:
    from pathlib import Path

    api = (Path(__file__).resolve().parents[1] / "docs" / "api" / "index.md").read_text()
    for name in lagnet.__all__:
        assert f"`{name}`" in api, name
