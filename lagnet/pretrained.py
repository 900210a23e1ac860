"""Pretrained folders: a trained model as ``model.safetensors`` beside its ``config.json``.

The layout of ``huggingface_hub``'s ``PyTorchModelHubMixin`` and of timm's hub weights. The
weights file holds tensors only (safetensors: no pickle, so loading never executes code);
``config.json`` holds every argument that rebuilds the model, the lagnet version that wrote it,
the input size and normalisation the model expects, and the metrics of its run when known::

    lagnet.save_pretrained(model, "market-resnet50", metrics={"mAP": 0.89}, input_size=(384, 128))
    model = lagnet.from_pretrained("market-resnet50")  # or a hub id: "org/name"

Both need the ``hub`` extra (``pip install "lagnet[hub]"``: safetensors and huggingface_hub),
imported only when they run. :func:`load_weights` reads every form of lagnet weights (a
pretrained folder, a ``.safetensors`` file with its ``config.json`` beside it, a run checkpoint
of ``lagnet train``, a bare state dict); ``build_lagnet(weights=...)`` and the ``--weights`` of
the ``lagnet`` commands go through it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lagnet._io import atomic_write
from lagnet.backbones import BACKBONES
from lagnet.checkpoint import load_checkpoint, state_dict_from
from lagnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lagnet.model import VARIANTS, LAGNet, check_input_size, load_checked

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_INPUT_SIZE",
    "MODEL_ARGS",
    "RUN_PRETRAINED_DIR",
    "WEIGHTS_NAME",
    "LoadedWeights",
    "from_pretrained",
    "load_weights",
    "model_from_weights",
    "pretrained_config",
    "require_hub_extra",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_ARGS: tuple[str, ...] = (
    "num_classes",
    "backbone",
    "variant",
    "num_attentions",
    "embed_dim",
    "reduce_dim",
    "drop_threshold",
)
"""The arguments of :class:`~lagnet.model.LAGNet` a ``config.json`` records (``model_args``)."""

RUN_PRETRAINED_DIR = "pretrained"
"""The pretrained folder ``lagnet train`` writes in its run folder for the best model."""

DEFAULT_INPUT_SIZE: tuple[int, int] = (384, 128)
"""The input size :func:`save_pretrained` records when none is given (the paper's)."""

_RUN_KEYS: tuple[str, ...] = ("num_classes", "backbone", "variant", "num_attentions")
_HUB_EXTRA = 'pip install "lagnet[hub]"'
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHOWN = 3


def require_hub_extra(what: str, module: str = "safetensors.torch") -> Any:
    """Import ``module`` of the ``hub`` extra for ``what``, or raise a one-line ImportError
    naming ``pip install "lagnet[hub]"``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs the optional package {module!r}, which is not installed: {_HUB_EXTRA}"
        ) from None


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = [*(int(p) for p in re.findall(r"\d+", version)[:2]), 0, 0][:2]
    return major, minor


def _check_metrics(metrics: object) -> dict[str, float] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {metrics!r}")
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metrics keys must be strings, got {key!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metrics[{key!r}] must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metrics[{key!r}] must be finite, got {value!r}")
        checked[key] = number
    return checked


def pretrained_config(
    model: LAGNet,
    *,
    metrics: Mapping[str, float] | None = None,
    input_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of ``model`` as a dict (see :func:`save_pretrained`)."""
    from lagnet import __version__

    if not isinstance(model, LAGNet):
        raise TypeError(
            f"save_pretrained needs a LAGNet, got {type(model).__name__} (unwrap a "
            "DistributedDataParallel with .module and a torch.compile result with ._orig_mod)"
        )
    h, w = check_input_size(DEFAULT_INPUT_SIZE if input_size is None else input_size)
    return {
        "library_name": "lagnet",
        "lagnet_version": __version__,
        "model_args": {
            "num_classes": model.num_classes,
            "backbone": model.backbone_name,
            "variant": model.variant,
            "num_attentions": model.num_attentions,
            "embed_dim": model.embed_dim,
            "reduce_dim": model.reduce_dim,
            "drop_threshold": float(model.drop.threshold),
        },
        "input_size": [h, w],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "feature_dim": model.feature_dim,
        "metrics": _check_metrics(metrics),
    }


def save_pretrained(
    model: LAGNet,
    directory: str | os.PathLike[str],
    *,
    metrics: Mapping[str, float] | None = None,
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Write ``model`` as a pretrained folder: ``model.safetensors`` and ``config.json``.

    The folder is created if needed; both files are written atomically (weights first), so a
    crash leaves either the previous file or the new one, never a truncated one.
    :func:`from_pretrained` rebuilds the model from the folder alone.

    Args:
        model: a :class:`~lagnet.model.LAGNet` (its weights are copied to the CPU).
        directory: the folder to write.
        metrics: scores of the model to record (e.g. ``{"mAP": 0.89, "rank1": 0.95}``).
        input_size: ``(H, W)`` the model was trained at (default :data:`DEFAULT_INPUT_SIZE`);
            images of ``(B, 3, H, W)``, RGB in ``[0, 1]`` normalised with the recorded
            ``mean``/``std``.

    Returns:
        The folder.

    Raises:
        ImportError: safetensors is missing (``pip install "lagnet[hub]"``).
    """
    st = require_hub_extra("save_pretrained")
    config = pretrained_config(model, metrics=metrics, input_size=input_size)
    folder = Path(directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"save_pretrained: {str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data: bytes = st.save(
        tensors, metadata={"format": "pt", "lagnet_version": config["lagnet_version"]}
    )
    atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(data))
    text = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write(folder / CONFIG_NAME, lambda f: f.write(text))
    return folder


@dataclass(frozen=True)
class LoadedWeights:
    """lagnet weights read from any of their forms (see :func:`load_weights`).

    Attributes:
        state: the state dict.
        model_args: keyword arguments of :class:`~lagnet.model.LAGNet` recorded with it
            (``num_classes`` included), or ``None`` for a bare state dict.
        input_size: ``(H, W)`` recorded with it, or ``None``.
        metrics: scores recorded with it, or ``None``.
        source: the file or folder, for messages.
    """

    state: dict[str, Tensor]
    model_args: dict[str, Any] | None
    input_size: tuple[int, int] | None
    metrics: dict[str, float] | None
    source: str


def _check_model_args(args: object, source: str, required: tuple[str, ...]) -> dict[str, Any]:
    """The recorded model arguments, each key and name checked, naming ``source``."""
    if not isinstance(args, dict):
        raise ValueError(f"{source}: the model configuration is not a JSON object: {args!r}")
    missing = [k for k in required if k not in args]
    if missing:
        raise ValueError(f"{source}: the model configuration lacks {', '.join(missing)}")
    if required == MODEL_ARGS:
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(
                f"{source}: unknown model setting(s) {', '.join(unknown)} (written by another "
                f"lagnet version?); this lagnet knows {', '.join(MODEL_ARGS)}"
            )
    if args["backbone"] not in BACKBONES:
        raise ValueError(
            f"{source}: unknown backbone {args['backbone']!r} (key 'backbone'); this lagnet "
            f"knows {', '.join(BACKBONES)}"
        )
    if args["variant"] not in VARIANTS:
        raise ValueError(
            f"{source}: unknown variant {args['variant']!r} (key 'variant'); this lagnet "
            f"knows {', '.join(VARIANTS)}"
        )
    return {k: args[k] for k in args if k in MODEL_ARGS}


def _read_config(path: Path) -> dict[str, Any]:
    from lagnet import __version__

    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: a pretrained folder holds {WEIGHTS_NAME} and {CONFIG_NAME}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a JSON file: {err}") from None
    if not isinstance(config, dict) or "model_args" not in config:
        raise ValueError(
            f"{str(path)!r} is not the config.json of a lagnet pretrained folder "
            "(it has no 'model_args')"
        )
    saved = str(config.get("lagnet_version", "0"))
    if _version_tuple(saved) > _version_tuple(__version__):
        raise ValueError(
            f"{str(path)!r} was written by lagnet {saved}, newer than this lagnet "
            f"{__version__}; upgrade lagnet to load it"
        )
    return config


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    st = require_hub_extra("loading a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {str(path)!r}")
    try:
        state: dict[str, Tensor] = st.load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises SafetensorError, an Exception
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{str(path)!r} is not a safetensors file ({first}); nothing in it was executed"
        ) from None
    return state


def _load_folder(weights_file: Path, config_file: Path) -> LoadedWeights:
    config = _read_config(config_file)
    source = repr(str(config_file))
    args = _check_model_args(config["model_args"], source, MODEL_ARGS)
    size = config.get("input_size")
    try:
        input_size = None if size is None else check_input_size(size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: input_size: {err}") from None
    metrics = config.get("metrics")
    return LoadedWeights(
        state=_read_safetensors(weights_file),
        model_args=args,
        input_size=input_size,
        metrics=_check_metrics(metrics) if isinstance(metrics, Mapping) else None,
        source=str(weights_file),
    )


def load_weights(path: str | os.PathLike[str]) -> LoadedWeights:
    """lagnet weights from any of their forms, never executing code.

    ``path`` is a pretrained folder (``model.safetensors`` + ``config.json``; the run folder
    of ``lagnet train`` stands for its ``pretrained/`` folder), a
    ``.safetensors`` file with its ``config.json`` beside it, a run checkpoint of
    ``lagnet train`` (``best.pth``/``last.pth``, with its ``model_config``), or a torch file
    holding a bare state dict (loaded with ``weights_only=True``).

    Raises:
        FileNotFoundError: no such file or folder, or a missing file of the pair.
        ValueError: a file that is not what it should be, a config naming an unknown
            backbone/variant or written by a newer lagnet.
        ImportError: a safetensors form without the ``hub`` extra.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / WEIGHTS_NAME).exists() and (p / "best.pth").is_file():
            if not (p / RUN_PRETRAINED_DIR / WEIGHTS_NAME).is_file():
                raise FileNotFoundError(
                    f"{str(p)!r} is a run folder without {RUN_PRETRAINED_DIR}/ (lagnet train "
                    f"writes it at the end of a run); pass {str(p / 'best.pth')!r}"
                )
            p = p / RUN_PRETRAINED_DIR  # the run folder of lagnet train: its best model
        return _load_folder(p / WEIGHTS_NAME, p / CONFIG_NAME)
    if p.suffix == ".safetensors":
        return _load_folder(p, p.with_name(CONFIG_NAME))
    obj = load_checkpoint(p, what="weights")
    source = str(p)
    state = state_dict_from(obj, source=source, what="weights")
    meta = obj.get("model_config") if isinstance(obj, dict) else None
    if meta is None:
        return LoadedWeights(state, None, None, None, source)
    args = _check_model_args(meta, f"{source!r} (model_config)", _RUN_KEYS)
    height, width = meta.get("height"), meta.get("width")
    input_size = (int(height), int(width)) if height is not None and width is not None else None
    metrics = obj.get("metrics")
    return LoadedWeights(
        state=state,
        model_args=args,
        input_size=input_size,
        metrics=_check_metrics(metrics) if isinstance(metrics, Mapping) else None,
        source=source,
    )


def model_from_weights(loaded: LoadedWeights, **overrides: Any) -> LAGNet:
    """Build the :class:`~lagnet.model.LAGNet` that ``loaded`` records and load it strictly.

    ``overrides`` are LAGNet arguments the weights do not record (a run checkpoint records
    no ``embed_dim``, for instance); one that contradicts a recorded value is a ValueError.
    """
    args = dict(loaded.model_args or {})
    conflicts = [
        f"{k}={v!r} (the weights record {args[k]!r})"
        for k, v in overrides.items()
        if k in args and args[k] != v
    ]
    if conflicts:
        raise ValueError(
            f"{loaded.source} records another model than asked: {', '.join(conflicts)}; "
            "leave these arguments out to use the recorded ones"
        )
    args.update(overrides)
    if "num_classes" not in args:
        raise TypeError(
            f"{loaded.source} records no model configuration (a bare state dict): pass "
            "num_classes and the model's settings"
        )
    num_classes = args.pop("num_classes")
    try:
        model = LAGNet(num_classes, **args)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{loaded.source}: {err}") from None
    load_checked(model, loaded.state, source=loaded.source)
    return model


def _locate(name_or_path: str | os.PathLike[str], revision: str | None) -> Path:
    """A local folder/file, or the folder a hub id downloads to."""
    local = Path(name_or_path).expanduser()
    if local.exists() or not isinstance(name_or_path, str):
        return local
    if not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(
            f"from_pretrained: {name_or_path!r} is neither an existing folder or file nor a "
            "hub id of the form 'org/name'"
        )
    hub = require_hub_extra(f"from_pretrained({name_or_path!r}) (a hub id)", "huggingface_hub")
    try:
        folder = hub.snapshot_download(
            repo_id=name_or_path,
            revision=revision,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            library_name="lagnet",
        )
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(
            f"{name_or_path!r} is no local folder, and getting it from the Hugging Face Hub "
            f"failed ({first}); check the path or the hub id and the network"
        ) from err
    return Path(folder)


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    revision: str | None = None,
) -> LAGNet:
    """The model of a pretrained folder (or hub id), rebuilt from its ``config.json`` alone.

    Args:
        name_or_path: a folder written by :func:`save_pretrained`, its ``.safetensors``
            file, or a Hugging Face Hub id ``"org/name"`` (downloaded with
            ``huggingface_hub`` into its cache).
        device: where to put the model (default: the CPU).
        revision: the hub revision (branch, tag or commit) of a hub id.

    Returns:
        The model in eval mode: ``model(images (B, 3, H, W)) -> (B, feature_dim)``.

    Raises:
        ImportError: the ``hub`` extra is missing (``pip install "lagnet[hub]"``).
        ValueError: a config naming an unknown backbone/variant or a newer lagnet, or weights
            that do not fit it (the first mismatching keys and the count of the rest).
    """
    require_hub_extra("from_pretrained")
    path = _locate(name_or_path, revision)
    if not path.exists():
        raise FileNotFoundError(f"from_pretrained: no such folder or file: {str(path)!r}")
    if not path.is_dir() and path.suffix != ".safetensors":
        raise ValueError(
            f"from_pretrained: {str(path)!r} is not a pretrained folder or .safetensors file "
            "(for a run checkpoint use lagnet.build_lagnet(weights=...))"
        )
    model = model_from_weights(load_weights(path))
    if device is not None:
        model = model.to(device)
    return model.eval()
