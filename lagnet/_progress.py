"""The one progress-bar helper: tqdm when it is installed and wanted, the plain iterable else.

A bar never changes what it wraps: the iterable is iterated exactly once, lazily, as it would
be without a bar. (``tqdm.auto.tqdm`` is ``tqdm_asyncio``, whose constructor calls
``iter(iterable)`` at once; for a ``DataLoader`` that is an extra iterator, which draws its base
seed from torch's global random stream, so a bar used to change the results of a seeded run.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any, Generic, TypeVar

__all__ = ["ProgressBar", "progress"]

T = TypeVar("T")


class ProgressBar(Generic[T]):
    """``iterable`` shown by a tqdm bar that is only told the count (see :func:`progress`)."""

    def __init__(self, iterable: Iterable[T], bar: Any) -> None:
        self._iterable = iterable
        self._bar = bar

    def __iter__(self) -> Iterator[T]:
        for item in self._iterable:  # the one iteration, exactly as without a bar
            self._bar.update(1)
            yield item

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` after the bar (``loss=...``)."""
        self._bar.set_postfix(**values)

    def close(self) -> None:
        """Close the bar (it is left on screen only with ``leave=True``)."""
        self._bar.close()


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` and tqdm is importable.

    ``kwargs`` go to ``tqdm`` (``desc``, ``total``, ``unit``, ``leave``...); ``total``
    defaults to ``len(iterable)`` when it has one. Without tqdm, or with ``enabled=False``,
    the iterable itself is returned, so callers never branch. With a bar, the iterable is
    iterated exactly once, when the result is, so results never depend on the display.
    """
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    if "total" not in kwargs and isinstance(iterable, Sized):
        kwargs["total"] = len(iterable)
    return ProgressBar(iterable, tqdm(**kwargs))  # no iterable: tqdm never touches it
