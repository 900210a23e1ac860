"""Small input checks shared by the layers and the model (clear errors, no host syncs)."""

from __future__ import annotations

from torch import Tensor


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
