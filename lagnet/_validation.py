"""Small input checks shared by the layers and the model (clear errors, no host syncs)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, dtype


def check_float_tensor(x: object, name: str, layout: str) -> Tensor:
    """Check that ``x`` is a floating-point tensor with as many dims as ``layout`` names.

    ``layout`` is written like ``"(B, C, H, W)"`` and appears in the error message.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ndim = layout.count(",") + 1
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D with shape {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_feature_map(x: object, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating-point ``(B, C, H, W)`` tensor and return it."""
    return check_float_tensor(x, name, "(B, C, H, W)")


def check_channels(x: Tensor, expected: int, name: str = "x") -> None:
    """Raise if ``x`` (``(B, C, ...)``) does not have ``expected`` channels."""
    if x.shape[1] != expected:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but this layer was built for "
            f"in_channels={expected} (shape {tuple(x.shape)})"
        )


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive ``int`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_nonnegative_int(value: object, name: str) -> int:
    """Return ``value`` if it is an ``int >= 0`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_float(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite ``float`` inside the given bounds.

    Ints and floats are accepted (bools, strings and tensors are refused with a TypeError);
    NaN, infinities and values outside ``[low, high]`` (``(low`` / ``high)`` when open) raise a
    ValueError that names ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def show_some(items: Iterable[object], limit: int, *, quote: bool = False) -> str:
    """``items`` for an error message: the first ``limit`` joined by ``", "`` (``repr`` of each
    with ``quote``), then ``" (and N more)"`` for the rest."""
    listed = list(items)
    shown = ", ".join(repr(x) if quote else str(x) for x in listed[:limit])
    more = len(listed) - limit
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_same_device(x: Tensor, other: Tensor, x_name: str, other_name: str) -> None:
    """Raise if ``other`` lives on another device than ``x``."""
    if other.device != x.device:
        raise ValueError(
            f"{other_name} is on {other.device} but {x_name} is on {x.device}; "
            f"move both to the same device"
        )


def autocast_dtype(device_type: str) -> dtype | None:
    """The autocast dtype active for ``device_type`` (``"cpu"``, ``"cuda"``), else ``None``."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else None
        )
    if device_type == "cpu":  # pragma: no cover - torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":  # pragma: no cover - torch < 2.4
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None  # pragma: no cover


def check_input_dtype(x: Tensor, expected: dtype, name: str, owner: str) -> None:
    """Raise a TypeError naming both dtypes if ``x`` cannot meet parameters of dtype ``expected``.

    Outside autocast the dtypes must be equal. Under autocast for ``x``'s device, ``x`` may also
    be float32 or the autocast dtype (autocast casts those); float64 and others still raise.
    """
    if x.dtype == expected:
        return
    cast_to = autocast_dtype(x.device.type)
    if cast_to is not None and x.dtype in (torch.float32, cast_to):
        return
    raise TypeError(
        f"{name} has dtype {x.dtype} but the parameters of {owner} are {expected}; cast the "
        f"input (x.to({expected})) or the module (module.to({x.dtype})), or run under "
        "torch.autocast"
    )
