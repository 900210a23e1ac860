"""The one progress-bar helper: tqdm when it is installed and wanted, the plain iterable else."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a ``tqdm`` bar when ``enabled`` and tqdm is importable.

    ``kwargs`` go to ``tqdm`` (``desc``, ``total``, ``unit``, ``leave``...). Without tqdm, or
    with ``enabled=False``, the iterable itself is returned, so callers never branch.
    """
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    bar: Iterable[T] = tqdm(iterable, **kwargs)
    return bar
