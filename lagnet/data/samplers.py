"""Identity-balanced (P x K) sampling for batch-hard triplet training.

A :class:`PKSampler` yields dataset indices in groups of ``P * K``: ``P`` identities with ``K``
images each. Used with ``DataLoader(dataset, batch_size=P * K, sampler=sampler)`` (the default
``drop_last=False`` is fine: the length is a multiple of ``P * K``), every batch holds ``P``
identities x ``K`` images. One epoch visits each training identity once. Randomness comes only
from a ``torch.Generator`` seeded with ``seed + epoch``; call :meth:`PKSampler.set_epoch` at the
start of every epoch to get a new order (without it every epoch repeats epoch 0).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from lagnet._validation import check_nonnegative_int, check_positive_int

__all__ = ["DistributedPKSampler", "PKSampler"]


def _check_pids(pids: object, name: str) -> list[int]:
    """``pids`` as a list of Python ints; floats, bools, strings and non-1-D input refused."""
    if isinstance(pids, (str, bytes)) or not hasattr(pids, "__len__"):
        raise TypeError(f"{name}: pids must be a sequence of ints, got {type(pids).__name__}")
    if isinstance(pids, torch.Tensor):
        if (
            pids.ndim != 1
            or pids.dtype == torch.bool
            or pids.is_floating_point()
            or pids.is_complex()
        ):
            raise TypeError(
                f"{name}: pids must be a 1-D integer tensor, got dtype {pids.dtype} "
                f"and shape {tuple(pids.shape)}"
            )
        out: list[int] = pids.tolist()
    else:
        out = []
        items: Iterable[object] = pids  # type: ignore[assignment]
        for i, pid in enumerate(items):
            if isinstance(pid, bool) or not isinstance(pid, numbers.Integral):
                raise TypeError(
                    f"{name}: pids must be ints, got {type(pid).__name__} {pid!r} at index {i}"
                )
            out.append(int(pid))
    if not out:
        raise ValueError(f"{name}: pids is empty (no training images)")
    return out


class PKSampler(Sampler[int]):
    """Sample ``P`` identities x ``K`` images per batch; one epoch = each identity once.

    Args:
        pids: the identity of every dataset index (e.g. ``[r.pid for r in dataset.train]``).
        P: identities per batch.
        K: images per identity; an identity with fewer than ``K`` images is drawn with
            replacement, otherwise ``K`` distinct images are drawn.
        seed: base seed; the epoch's generator is seeded with ``seed + epoch``.

    The identities are shuffled each epoch and cut into groups of ``P``; the last incomplete
    group (``num_ids % P`` identities) is dropped, so ``len(sampler) == (num_ids // P) * P * K``.
    """

    def __init__(self, pids: Sequence[int], P: int, K: int, *, seed: int = 0) -> None:
        name = type(self).__name__
        check_positive_int(P, f"{name}: P")
        check_positive_int(K, f"{name}: K")
        check_nonnegative_int(seed, f"{name}: seed")
        by_pid: dict[int, list[int]] = {}
        for index, pid in enumerate(_check_pids(pids, name)):
            by_pid.setdefault(pid, []).append(index)
        self.P = P
        self.K = K
        self.seed = seed
        self.epoch = 0
        self.identities: list[int] = sorted(by_pid)
        self._indices = [torch.tensor(by_pid[pid], dtype=torch.long) for pid in self.identities]
        self.num_groups = self._ids_per_replica() // P
        if self.num_groups == 0:
            raise ValueError(
                f"{type(self).__name__}: {len(self.identities)} identities"
                f"{self._replica_note()} cannot fill one group of P={P} identities"
            )

    @property
    def num_ids(self) -> int:
        """Number of distinct identities in ``pids``."""
        return len(self.identities)

    def _ids_per_replica(self) -> int:
        return len(self.identities)

    def _replica_note(self) -> str:
        return ""

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the order is a deterministic function of ``seed + epoch``."""
        self.epoch = check_nonnegative_int(epoch, f"{type(self).__name__}.set_epoch: epoch")

    def _draw(self) -> list[torch.Tensor]:
        """The epoch's identity order (global) with ``K`` drawn indices per identity."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self._indices), generator=g).tolist()
        draws: list[torch.Tensor] = []
        for i in order:
            idx = self._indices[i]
            n = idx.numel()
            if n >= self.K:
                pick = torch.randperm(n, generator=g)[: self.K]
            else:
                pick = torch.randint(n, (self.K,), generator=g)
            draws.append(idx[pick])
        return draws

    def _select(self, draws: list[torch.Tensor]) -> list[torch.Tensor]:
        return draws[: self.num_groups * self.P]

    def __iter__(self) -> Iterator[int]:
        selected = self._select(self._draw())
        yield from torch.cat(selected).tolist()

    def __len__(self) -> int:
        return self.num_groups * self.P * self.K


class DistributedPKSampler(PKSampler):
    """:class:`PKSampler` for data-parallel training: disjoint identities on every rank.

    Every rank shuffles the identities with the shared ``seed + epoch`` generator (the same
    draws as :class:`PKSampler`); rank ``r`` takes identities ``r, r + R, r + 2R, ...`` of that
    order. All ranks yield the same number of indices: each keeps the common number of full
    ``P``-groups, ``(num_ids // R) // P``. ``num_replicas`` and ``rank`` default to the
    initialised ``torch.distributed`` process group.
    """

    def __init__(
        self,
        pids: Sequence[int],
        P: int,
        K: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        if num_replicas is not None:
            check_positive_int(num_replicas, "DistributedPKSampler: num_replicas")
        if rank is not None:
            check_nonnegative_int(rank, "DistributedPKSampler: rank")
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "DistributedPKSampler: torch.distributed is not initialised; pass "
                    "num_replicas and rank explicitly"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"DistributedPKSampler: need num_replicas >= 1 and 0 <= rank < num_replicas, "
                f"got num_replicas={num_replicas}, rank={rank}"
            )
        self.num_replicas = num_replicas
        self.rank = rank
        super().__init__(pids, P, K, seed=seed)

    def _ids_per_replica(self) -> int:
        return len(self.identities) // self.num_replicas

    def _replica_note(self) -> str:
        return f" split over {self.num_replicas} replicas"

    def _select(self, draws: list[torch.Tensor]) -> list[torch.Tensor]:
        return draws[self.rank :: self.num_replicas][: self.num_groups * self.P]
