"""The training and evaluation engine: one training step, one epoch, one evaluation.

:class:`TrainStep` owns what a step of LAG-Net training needs beyond the model, the loss and the
optimizer: autocast (``amp="bf16"`` or ``"fp16"``), the gradient scaler (float16 only), the
``channels_last`` layout and, optionally, ``torch.compile`` of the forward pass and the loss
(``fullgraph=True``, static shapes). A step never waits for the device: the loss terms it
returns stay on the device, label checks happen on the CPU before the copy, and
:func:`train_one_epoch` accumulates the terms and a non-finite flag on the device, reading them
back once per logging interval.

    step = TrainStep(model, criterion, optimizer, amp=default_amp(device), channels_last=True)
    for epoch in range(epochs):
        means = train_one_epoch(step, train_loader, epoch=epoch, device=device)
    result = evaluate(model, query_loader, gallery_loader, amp=default_amp(device))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any, NamedTuple, get_args

import torch
from torch import Tensor, nn

from lagnet._progress import progress as progress_bar
from lagnet._validation import check_positive_int
from lagnet.evaluation.distance import Metric
from lagnet.evaluation.extract import (
    AMP_DTYPES,
    AmpMode,
    extract_features,
    is_records,
    records_loader,
)
from lagnet.evaluation.features import evaluate_features
from lagnet.evaluation.result import RankResult
from lagnet.layers._kernels import is_capturing
from lagnet.losses import LAGNetLoss, check_label_range
from lagnet.model import LAGNetOutput

__all__ = [
    "AmpMode",
    "NonFiniteLossError",
    "StepResult",
    "TrainStep",
    "default_amp",
    "evaluate",
    "train_one_epoch",
]

TERMS: tuple[str, ...] = ("loss", "cross_entropy", "triplet", "center")
"""The loss terms :func:`train_one_epoch` averages, in this order."""


def default_amp(device: torch.device | str) -> AmpMode | None:
    """``"bf16"`` on CUDA GPUs with bfloat16 (compute capability 8.0+), ``"fp16"`` on older
    CUDA GPUs, ``None`` (float32) elsewhere, the CPU included."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _compile_settings(
    device: torch.device, ddp: bool = False, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``torch.compile`` keywords of a compiled :class:`TrainStep`.

    ``fullgraph=True`` (off under ``DistributedDataParallel``, which splits the graph at its
    gradient buckets) and ``dynamic=False``; on CUDA without DDP, ``mode="reduce-overhead"``:
    CUDA graphs replay the step's kernels with one launch, which the step needs to keep the
    GPU busy (``docs/training.md``). ``options`` are added last and win; one that names a
    ``mode``, ``options`` or another ``backend`` turns the CUDA-graphs default off.
    """
    settings: dict[str, Any] = {"fullgraph": not ddp, "dynamic": False}
    options = dict(options or {})
    chosen = {"mode", "options", "backend"} & set(options)
    if device.type == "cuda" and not ddp and not chosen:
        settings["mode"] = "reduce-overhead"
    return {**settings, **options}


def _check_amp(amp: object) -> AmpMode | None:
    if amp is None:
        return None
    if isinstance(amp, str) and amp in AMP_DTYPES:
        return amp  # type: ignore[return-value]
    raise ValueError(f"amp must be one of {get_args(AmpMode)} or None, got {amp!r}")


class StepResult(NamedTuple):
    """What a training step returns: detached tensors on the device (reading them syncs).

    Attributes:
        loss: ``()`` the total loss.
        components: ``{"cross_entropy", "triplet", "center"}`` ``()`` weighted terms.
    """

    loss: Tensor
    components: dict[str, Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (the training diverged).

    Attributes:
        epoch: the epoch index given to :func:`train_one_epoch`.
        batch: the 0-based index of the first batch whose loss was not finite.
        value: that loss (NaN when the forward pass itself failed on non-finite values).
        detail: what was found, when known (e.g. which activations or weights went
            non-finite), else ``None``.
    """

    def __init__(self, epoch: int, batch: int, value: float, *, detail: str | None = None) -> None:
        self.epoch = epoch
        self.batch = batch
        self.value = value
        self.detail = detail
        what = f"the loss became {value}" if detail is None else "the training diverged"
        because = "" if detail is None else f": {detail}"
        super().__init__(
            f"{what} at epoch {epoch}, batch {batch} (0-based){because}; the weights "
            "after this batch are not usable: the last checkpoint is the recovery point "
            "(resume from it, perhaps with a lower learning rate)"
        )


class _NonFiniteInputError(ValueError):
    """The input images of a step hold NaN or infinite values (a data problem)."""


def _non_finite_input_message(count: int | None, samples: list[int] | None) -> str:
    where = "" if samples is None else f" in sample(s) {samples[:8]}{' ...' * (len(samples) > 8)}"
    many = "" if count is None else f"{count} "
    return (
        f"the input images hold {many}NaN or infinite values{where}; the data pipeline "
        "produced them (a model cannot train on them): check the images and the transforms"
    )


def _non_finite_tensor(value: Any) -> bool:
    """Whether a module output (a tensor, or a tuple / dict of them) holds NaN or inf."""
    if isinstance(value, Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, Mapping):
        return any(_non_finite_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_non_finite_tensor(v) for v in value)
    return False


def _describe_non_finite(step: TrainStep, images: Tensor, labels: Tensor) -> str | None:
    """Why a CPU forward pass with finite input images failed, in the user's terms, or ``None``.

    Called only after a step failed: looks for non-finite weights, then replays the forward
    pass (no gradient, RNG and buffers restored) to name the first module whose output is not
    finite.
    """
    named = [(n, p) for n, p in step.model.named_parameters() if p.is_floating_point()]
    bad = [n for n, p in named if not bool(torch.isfinite(p).all())]
    if bad:
        return (
            f"the model's weights hold NaN or infinite values ({len(bad)} of {len(named)} "
            f"tensors, e.g. {bad[0]!r}): an earlier step diverged (lower the learning rate) "
            "or the weights were loaded broken"
        )
    first: list[str] = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not first and _non_finite_tensor(output):
                first.append(name)

        return record

    modules = [(n, m) for n, m in step.model.named_modules() if n]
    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    buffers = {n: b.clone() for n, b in step.model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            step._forward_loss(images, labels)
    except Exception:  # the replay fails as the step did; the hooks have seen what we need
        pass
    finally:
        for handle in handles:
            handle.remove()
        own = dict(step.model.named_buffers())
        with torch.no_grad():
            for n, b in buffers.items():
                own[n].copy_(b)
    if not first:
        return None
    largest, where = max((float(p.detach().abs().max()), n) for n, p in named if p.numel())
    return (
        f"the forward pass produced NaN or infinite activations (first in {first[0]!r}) from "
        f"finite input images; the largest weight is {largest:.3g} (in {where!r}): an earlier "
        "step diverged (lower the learning rate)"
    )


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("the model has no parameters to train")
    return first.device


def _check_optimizer_owns(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and not any(id(p) in owned for p in trainable):
        raise ValueError(
            f"the optimizer holds none of the model's {len(trainable)} trainable parameters "
            f"(it holds {len(owned)} other tensor(s)), so the weights would never change; "
            "build it over model.parameters()"
        )


def _unpack_batch(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        missing = [key for key in ("images", "pids") if key not in batch]
        if missing:
            raise ValueError(
                f"batch {index}: a dict batch needs the keys 'images' and 'pids'; it lacks "
                f"{missing} (its keys: {sorted(map(str, batch))})"
            )
        images, labels = batch["images"], batch["pids"]
    elif isinstance(batch, Sequence) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise TypeError(
            f"batch {index}: expected (images, labels, ...) as lagnet.data.ImageDataset yields, "
            f"got {type(batch).__name__}"
        )
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"batch {index}: images and labels must be tensors, got "
            f"{type(images).__name__} and {type(labels).__name__}"
        )
    return images, labels


class TrainStep:
    """One training step: forward, loss, ``zero_grad(set_to_none=True)``, backward, step.

    Args:
        model: a :class:`~lagnet.LAGNet` (its ``forward_train`` runs), or a module whose
            training-mode ``forward`` returns a :class:`~lagnet.LAGNetOutput`, such as a
            ``DistributedDataParallel``-wrapped LAGNet.
        criterion: the :class:`~lagnet.LAGNetLoss`, on the model's device.
        optimizer: any optimizer over the model's parameters (a fused or foreach Adam keeps
            the float16 scaler's step free of host synchronisation).
        amp: ``"bf16"`` or ``"fp16"`` for :func:`torch.autocast` on the model's device, or
            ``None`` for float32. The losses compute in float32 either way.
        channels_last: convert the model (now) and each batch of images to
            ``torch.channels_last``.
        compile: run the forward pass and the loss through
            ``torch.compile(fullgraph=True, dynamic=False)``; backward is compiled with it. On
            CUDA the compiled step is also captured in CUDA graphs (``mode="reduce-overhead"``;
            the ``compile_options`` attribute says what was used). Shapes are static, so give
            it full batches (``drop_last=True``, as the PK loaders do): another batch size
            compiles again. Off by default: on the CPU the compiled step is hardly faster than
            eager and takes minutes to compile (``docs/training.md``).
        compile_options: more ``torch.compile`` keywords, e.g. ``{"mode": "default"}`` (no
            CUDA graphs), ``{"mode": "max-autotune"}`` or ``{"backend": "aot_eager"}``.

    Attributes:
        scaler: the ``torch.amp.GradScaler`` for ``amp="fp16"``, else ``None``.
        compile_options: the ``torch.compile`` keywords used (empty when not compiled).
        cuda_graphs: whether the step replays CUDA graphs; its results are then copies, so
            they stay valid after the next step.
        input_finite: ``()`` bool on the device, whether the last step's images were finite
            (``None`` on the CPU, where a non-finite image raises at once);
            :func:`train_one_epoch` reads it back with the loss.

    Unusual inputs: an optimizer that holds none of the model's trainable parameters is a
    ValueError here; a model in eval mode trains with batch-norm running statistics and no
    drop, which is allowed, with one warning. On the CPU, input images with NaN or infinite
    values raise a ValueError before the step, and a forward pass that fails on non-finite
    activations or weights (a diverged training) raises ``FloatingPointError`` naming them
    (:func:`train_one_epoch` turns it into :class:`NonFiniteLossError`). On a GPU nothing is
    read back per step: non-finite inputs and losses are reported at the epoch loop's next
    read-back.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: LAGNetLoss,
        optimizer: torch.optim.Optimizer,
        *,
        amp: AmpMode | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(criterion, LAGNetLoss):
            raise TypeError(f"criterion must be a LAGNetLoss, got {type(criterion).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.amp = _check_amp(amp)
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.device = _model_device(model)
        _check_optimizer_owns(optimizer, model)
        centers = criterion.center.centers
        if centers.device != self.device:
            raise ValueError(
                f"the criterion is on {centers.device} but the model is on {self.device}; "
                "move it with criterion.to(device)"
            )
        self.channels_last = bool(channels_last)
        self.compiled = bool(compile)
        self.num_classes = criterion.center.num_classes
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None
        )
        forward: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]] = self._forward_loss
        self.compile_options: dict[str, Any] = {}
        if self.compiled:
            ddp = isinstance(model, nn.parallel.DistributedDataParallel)
            self.compile_options = _compile_settings(self.device, ddp, compile_options)
            forward = torch.compile(forward, **self.compile_options)
        self.cuda_graphs = (
            self.device.type == "cuda"
            and self.compile_options.get("mode") in _CUDA_GRAPH_MODES
            and self.compile_options.get("backend", "inductor") == "inductor"
        )
        self._forward = forward
        self.input_finite: Tensor | None = None
        self._warned_eval = False

    def _forward_loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        dtype = AMP_DTYPES[self.amp] if self.amp is not None else None
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            forward_train = getattr(self.model, "forward_train", None)
            output = forward_train(images) if callable(forward_train) else self.model(images)
            if not isinstance(output, LAGNetOutput):
                raise TypeError(
                    "the model must return a LAGNetOutput in training mode, got "
                    f"{type(output).__name__}; call model.train()"
                )
            result: tuple[Tensor, dict[str, Tensor]] = self.criterion(output, labels)
            return result

    def _prepare(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if labels.device.type == "cpu":  # free on the CPU; on the device it would be a sync
            check_label_range(labels, self.num_classes)
        self.input_finite = None
        # on the CPU no device sync; a finite sum proves every value finite (1.6 ms for a
        # (64, 3, 384, 128) batch against 130 ms for isfinite().all()), an infinite one may be
        # an overflow of finite values: then the exact check decides
        if (
            self.device.type == "cpu"
            and images.is_floating_point()
            and not bool(torch.isfinite(images.sum()))
        ):
            finite = torch.isfinite(images).flatten(1).all(dim=1)
            if not bool(finite.all()):
                count = int((~torch.isfinite(images)).sum())
                samples = torch.nonzero(~finite).flatten().tolist()
                raise _NonFiniteInputError(_non_finite_input_message(count, samples))
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        if self.device.type != "cpu" and images.is_floating_point():  # read back by the epoch
            self.input_finite = torch.isfinite(images).all()
        return images, labels.to(self.device, non_blocking=True)

    def __call__(self, images: Tensor, labels: Tensor) -> StepResult:
        """Train on one batch: ``images (B, 3, H, W)``, ``labels (B,)`` -> :class:`StepResult`."""
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(
                f"images and labels must be tensors, got {type(images).__name__} and "
                f"{type(labels).__name__}"
            )
        if not self.model.training and not self._warned_eval:
            self._warned_eval = True
            warnings.warn(
                "TrainStep: the model is in eval mode, so it trains with batch-norm running "
                "statistics and without drop; call model.train() unless this is deliberate "
                "(said once)",
                UserWarning,
                stacklevel=2,
            )
        images, labels = self._prepare(images, labels)
        if self.cuda_graphs:  # a new step: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        try:
            loss, components = self._forward(images, labels)
        except Exception as err:
            if self.device.type != "cpu" or is_capturing():
                raise
            detail = _describe_non_finite(self, images, labels)
            if detail is None:
                raise
            raise FloatingPointError(detail) from err
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
        if self.cuda_graphs:  # copies that outlive the next replay of the graphs
            return StepResult(
                loss.detach().clone(), {k: v.detach().clone() for k, v in components.items()}
            )
        return StepResult(loss.detach(), {k: v.detach() for k, v in components.items()})

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state under ``"scaler"`` (empty without a scaler)."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A saved scaler state is ignored when ``amp`` is not
        ``"fp16"`` now (e.g. resuming an fp16 run in bf16); without one the scaler starts
        fresh."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        unknown = sorted(set(state) - {"scaler"})
        if unknown:
            raise ValueError(f"unexpected keys in the TrainStep state: {unknown}")
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def train_one_epoch(
    step: TrainStep,
    loader: Iterable[Any],
    *,
    epoch: int = 0,
    log_every: int = 50,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Run ``step`` over every batch of ``loader`` and return the epoch means of the loss terms.

    The model and the criterion are put in training mode. The terms (:data:`TERMS`) are
    summed on the device; the sums and a non-finite flag are read back every ``log_every``
    batches (updating the progress bar) and at the end, so the loop waits for the device only
    then.

    Args:
        step: the :class:`TrainStep`.
        loader: batches ``(images, labels, ...)`` as :class:`lagnet.data.ImageDataset` yields
            (or dicts with ``"images"`` and ``"pids"``).
        epoch: the epoch index, for the progress bar and the error.
        log_every: batches between read-backs.
        progress: a tqdm bar when tqdm is installed.
        device: where the sums live (default: the step's device).

    Returns:
        ``{"loss", "cross_entropy", "triplet", "center"}`` means over the batches.

    Raises:
        NonFiniteLossError: at the read-back after the first batch whose loss was NaN or
            infinite (or when a later step fails), naming that batch; on the CPU also when a
            step's forward pass fails on non-finite activations or weights (a diverged
            training), naming the batch and what went non-finite.
        ValueError: the loader yielded no batches, a dict batch lacks ``"images"`` or
            ``"pids"``, or a batch's input images hold NaN or infinite values (named by epoch
            and batch: at once on the CPU, at the next read-back on a GPU).
    """
    if not isinstance(step, TrainStep):
        raise TypeError(f"step must be a TrainStep, got {type(step).__name__}")
    check_positive_int(log_every, "log_every")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch must be an int, got {type(epoch).__name__} ({epoch!r})")
    where = step.device if device is None else torch.device(device)
    step.model.train()
    step.criterion.train()
    sums = torch.zeros(len(TERMS), device=where)
    first_bad = torch.full((), -1, dtype=torch.int64, device=where)
    first_bad_input = torch.full((), -1, dtype=torch.int64, device=where)
    bad_value = torch.zeros((), device=where)
    total = len(loader) if isinstance(loader, Sized) else None
    bar = progress_bar(
        loader, progress, total=total, desc=f"epoch {epoch}", unit="batch", leave=False
    )
    count = 0
    read_at = 0

    def non_finite() -> NonFiniteLossError | None:
        bad = int(first_bad.item())
        return NonFiniteLossError(epoch, bad, float(bad_value.item())) if bad >= 0 else None

    def bad_input() -> ValueError | None:
        bad = int(first_bad_input.item())
        loss_bad = int(first_bad.item())
        if bad < 0 or 0 <= loss_bad < bad:
            return None
        return ValueError(f"epoch {epoch}, batch {bad}: {_non_finite_input_message(None, None)}")

    def read_back() -> list[float]:
        error: Exception | None = bad_input() or non_finite()
        if error is not None:
            raise error
        return [float(v) for v in sums.tolist()]

    try:
        for index, batch in enumerate(bar):
            images, labels = _unpack_batch(batch, index)
            try:
                result = step(images, labels)
            except _NonFiniteInputError as err:
                raise ValueError(f"epoch {epoch}, batch {index}: {err}") from None
            except Exception as err:
                # weights spoilt by an earlier non-finite loss can fail a later step (e.g. NaN
                # attention maps are refused on the CPU): report the loss, the first cause
                error: Exception | None = bad_input() or non_finite()
                if error is not None:
                    raise error from err
                if isinstance(err, FloatingPointError):  # diverged on the CPU: as a NaN loss
                    raise NonFiniteLossError(epoch, index, float("nan"), detail=str(err)) from err
                raise
            terms = torch.stack([result.loss, *(result.components[k] for k in TERMS[1:])])
            terms = terms.to(where, torch.float32)
            sums += terms
            new_bad = (first_bad < 0) & ~torch.isfinite(terms[0])
            first_bad = torch.where(new_bad, index, first_bad)
            if step.input_finite is not None:
                new_bad_input = (first_bad_input < 0) & ~step.input_finite.to(where)
                first_bad_input = torch.where(new_bad_input, index, first_bad_input)
            bad_value = torch.where(new_bad, terms[0], bad_value)
            count += 1
            if count - read_at >= log_every:
                values = read_back()
                read_at = count
                set_postfix = getattr(bar, "set_postfix", None)
                if callable(set_postfix):
                    set_postfix(loss=f"{values[0] / count:.4f}")
    finally:
        close = getattr(bar, "close", None)
        if bar is not loader and callable(close):
            close()
    if count == 0:
        raise ValueError("the training loader yielded no batches")
    values = read_back()
    return {name: value / count for name, value in zip(TERMS, values, strict=True)}


def evaluate(
    model: nn.Module,
    query_loader: Iterable[Any],
    gallery_loader: Iterable[Any],
    *,
    flip: bool = True,
    metric: Metric = "euclidean",
    rerank: bool = False,
    amp: AmpMode | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    input_size: tuple[int, int] | None = None,
    cache: str = "auto",
    batch_size: int = 64,
) -> RankResult:
    """Embed the query and gallery sets and rank them (CMC, mAP, mINP).

    Embeddings come from :func:`~lagnet.evaluation.extract_features` (eval mode, flip TTA as
    one batch, L2-normalised, under ``amp`` autocast), and are ranked by
    :func:`~lagnet.evaluation.evaluate_features` with the Market-1501 protocol, in chunks
    (the whole distance matrix is never built).

    Args:
        model: maps ``(B, 3, H, W)`` images to ``(B, D)`` embeddings in eval mode (a
            ``DistributedDataParallel`` wrapper is unwrapped).
        query_loader, gallery_loader: batches ``(images, pids, camids, ...)``, or the
            records of the splits (``dataset.query``, ``dataset.gallery``), both decoded with
            the test preset at ``input_size`` before any embedding, as ``cache`` says
            (:func:`lagnet.data.build_loader`).
        flip: add the embedding of the mirrored image.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        rerank: k-reciprocal re-ranking.
        amp: ``"bf16"``, ``"fp16"`` or ``None``.
        device: default: the model's device.
        progress: tqdm bars while embedding.
        input_size: ``(H, W)`` of the records (required with records).
        cache: with records: ``"auto"``, ``"device"``, ``"host"`` or ``"off"``.
        batch_size: with records: images per batch.
    """
    amp = _check_amp(amp)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    loaders = [
        records_loader(
            split,
            input_size,
            cache,
            batch_size,
            _model_device(model) if device is None else torch.device(device),
            progress,
        )
        if is_records(split)
        else split
        for split in (query_loader, gallery_loader)
    ]  # records: both splits decoded (every unreadable image named) before any embedding
    features = [
        extract_features(model, loader, flip=flip, device=device, amp=amp, progress=progress)
        for loader in loaders
    ]
    q, g = features
    return evaluate_features(
        q.features, g.features, q.pids, g.pids, q.camids, g.camids,
        metric=metric, rerank=rerank,
    )  # fmt: skip
