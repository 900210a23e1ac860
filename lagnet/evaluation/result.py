"""The result of a re-ID evaluation: :class:`RankResult`."""

from __future__ import annotations

from dataclasses import dataclass

from ._shared import CmcMode, FloatArray

__all__ = ["RankResult"]


@dataclass(frozen=True, eq=False, repr=False)
class RankResult:
    """Result of :func:`~lagnet.evaluation.evaluate_rank` /
    :func:`~lagnet.evaluation.evaluate_features`.

    Attributes:
        mAP: mean average precision over the valid queries.
        cmc: ``(max_rank,)`` float64; ``cmc[k]`` is the fraction of valid queries whose first
            correct match is at rank ``<= k + 1``.
        mINP: mean inverse negative penalty over the valid queries.
        num_valid_queries: queries with at least one correct match left after removing the
            gallery items that share both the query's id and camera.
        ap: ``(Q,)`` float64 per-query average precision, NaN for skipped queries.
        inp: ``(Q,)`` float64 per-query INP, NaN for skipped queries.
        cmc_padded: True when ``max_rank`` exceeds the longest possible ranked list (the gallery
            size, or the number of gallery identities in ``"cuhk03"`` mode); the entries past it
            repeat the last value, which is 1.0.
        cmc_mode: ``"market"`` or ``"cuhk03"``.
    """

    mAP: float
    cmc: FloatArray
    mINP: float
    num_valid_queries: int
    ap: FloatArray
    inp: FloatArray
    cmc_padded: bool
    cmc_mode: CmcMode = "market"

    @property
    def rank1(self) -> float:
        """``cmc[0]``: the fraction of valid queries whose best-ranked item is a match."""
        return float(self.cmc[0])

    def __repr__(self) -> str:
        return (
            f"RankResult(mAP={self.mAP:.4f}, rank1={self.rank1:.4f}, mINP={self.mINP:.4f}, "
            f"num_valid_queries={self.num_valid_queries}, max_rank={self.cmc.shape[0]}, "
            f"cmc_padded={self.cmc_padded}, cmc_mode={self.cmc_mode!r})"
        )
