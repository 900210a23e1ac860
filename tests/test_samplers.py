"""PK sampling: batch composition, epoch length, determinism, replacement, distributed split."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lagnet.data import DistributedPKSampler, PKSampler

# 11 identities with 1..11 images each, indices interleaved so ids are not contiguous.
PIDS = [pid for n in range(1, 12) for pid in [100 + n] * n]
random.Random(0).shuffle(PIDS)


def batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_batches_hold_p_identities_times_k_images() -> None:
    P, K = 3, 4
    sampler = PKSampler(PIDS, P, K, seed=1)
    indices = list(sampler)
    assert len(indices) == len(sampler) == (11 // P) * P * K == 36
    seen: list[int] = []
    for batch in batches(indices, P * K):
        counts = Counter(PIDS[i] for i in batch)
        assert len(counts) == P and set(counts.values()) == {K}
        seen += counts
    # One epoch visits each identity at most once; the incomplete last group (2 ids) is dropped.
    assert len(seen) == len(set(seen)) == 9


def test_dataloader_with_batch_size_p_times_k() -> None:
    P, K = 2, 3
    sampler = PKSampler(PIDS, P, K)
    loader = DataLoader(torch.tensor(PIDS), batch_size=P * K, sampler=sampler)
    got = [b.tolist() for b in loader]
    assert len(got) == 11 // P
    for batch in got:
        assert sorted(Counter(batch).values()) == [K] * P


def test_identities_with_few_images_are_drawn_with_replacement() -> None:
    P, K = 11, 4
    indices = list(PKSampler(PIDS, P, K, seed=3))
    by_pid: dict[int, list[int]] = {}
    for i in indices:
        by_pid.setdefault(PIDS[i], []).append(i)
    assert len(by_pid) == 11
    for pid, picked in by_pid.items():
        n = pid - 100
        assert len(picked) == K
        assert all(PIDS[i] == pid for i in picked)
        if n >= K:
            assert len(set(picked)) == K  # without replacement
        else:
            assert len(set(picked)) <= n  # repeats are unavoidable
    assert len(set(by_pid[101])) == 1


def test_deterministic_given_seed_and_epoch_and_ignores_global_rngs() -> None:
    a = PKSampler(PIDS, 2, 4, seed=7)
    b = PKSampler(PIDS, 2, 4, seed=7)
    first = list(a)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    assert list(b) == first == list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    assert list(PKSampler(PIDS, 2, 4, seed=8)) != first
    # Seeds and epochs combine as seed + epoch.
    c = PKSampler(PIDS, 2, 4, seed=6)
    c.set_epoch(1)
    assert list(c) == first


def test_order_varies_across_epochs() -> None:
    sampler = PKSampler(PIDS, 1, 2)
    orders = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        orders.add(tuple(PIDS[i] for i in list(sampler)[::2]))
    assert len(orders) == 5


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"^PKSampler: P must be >= 1, got 0$"):
        PKSampler(PIDS, 0, 4)
    with pytest.raises(ValueError, match=r"^PKSampler: K must be >= 1, got -2$"):
        PKSampler(PIDS, 2, -2)
    with pytest.raises(ValueError, match="11 identities cannot fill one group of P=12"):
        PKSampler(PIDS, 12, 4)
    with pytest.raises(ValueError, match=r"^PKSampler: pids is empty \(no training images\)$"):
        PKSampler([], 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"P": 1.5}, r"^PKSampler: P must be an int, got float \(1.5\)$"),
        ({"K": 2.0}, r"^PKSampler: K must be an int, got float \(2.0\)$"),
        ({"P": True}, r"^PKSampler: P must be an int, got bool \(True\)$"),
        ({"K": "4"}, r"^PKSampler: K must be an int, got str \('4'\)$"),
        ({"seed": 0.5}, r"^PKSampler: seed must be an int, got float \(0.5\)$"),
        ({"pids": [0, 1, 2.0]}, r"^PKSampler: pids must be ints, got float 2.0 at index 2$"),
        ({"pids": [0, True]}, r"^PKSampler: pids must be ints, got bool True at index 1$"),
        ({"pids": "0012"}, r"^PKSampler: pids must be a sequence of ints, got str$"),
        ({"pids": torch.zeros(4)}, r"pids must be a 1-D integer tensor, got dtype torch.float32"),
        ({"pids": torch.zeros(2, 2, dtype=torch.long)}, r"and shape \(2, 2\)$"),
    ],
)
def test_wrong_types_fail_at_construction(kwargs: dict[str, object], message: str) -> None:
    """Wrong types fail when the sampler is built, not later when it is iterated."""
    args: dict[str, object] = {"pids": PIDS, "P": 2, "K": 2, **kwargs}
    with pytest.raises(TypeError, match=message):
        PKSampler(**args)  # type: ignore[arg-type]


def test_negative_seed_and_epoch_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^PKSampler: seed must be >= 0, got -1$"):
        PKSampler(PIDS, 2, 2, seed=-1)
    sampler = PKSampler(PIDS, 2, 2)
    with pytest.raises(ValueError, match=r"^PKSampler.set_epoch: epoch must be >= 0, got -3$"):
        sampler.set_epoch(-3)
    with pytest.raises(TypeError, match=r"^PKSampler.set_epoch: epoch must be an int"):
        sampler.set_epoch(1.0)  # type: ignore[arg-type]
    assert sampler.epoch == 0


def test_integer_tensor_and_numpy_pids_are_accepted() -> None:
    expected = list(PKSampler(PIDS, 2, 2))
    assert list(PKSampler(torch.tensor(PIDS), 2, 2)) == expected
    assert list(PKSampler(np.array(PIDS), 2, 2)) == expected  # type: ignore[arg-type]


def test_distributed_argument_types() -> None:
    with pytest.raises(TypeError, match=r"^DistributedPKSampler: num_replicas must be an int"):
        DistributedPKSampler(PIDS, 1, 2, num_replicas=2.0, rank=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^DistributedPKSampler: rank must be >= 0, got -1$"):
        DistributedPKSampler(PIDS, 1, 2, num_replicas=2, rank=-1)


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, 6), min_size=1, max_size=20),
    P=st.integers(1, 5),
    K=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_composition_property(counts: list[int], P: int, K: int, seed: int) -> None:
    pids = [pid for pid, n in enumerate(counts) for _ in range(n)]
    if len(counts) < P:
        with pytest.raises(ValueError):
            PKSampler(pids, P, K, seed=seed)
        return
    indices = list(PKSampler(pids, P, K, seed=seed))
    assert len(indices) == (len(counts) // P) * P * K
    for batch in batches(indices, P * K):
        assert sorted(Counter(pids[i] for i in batch).values()) == [K] * P


# --- distributed ----------------------------------------------------------------------------


def test_distributed_ranks_are_disjoint_and_equal_length() -> None:
    P, K, R = 2, 3, 3
    samplers = [DistributedPKSampler(PIDS, P, K, num_replicas=R, rank=r, seed=5) for r in range(R)]
    # 11 ids over 3 ranks: 3 ids each at least, one full group of 2 ids per rank.
    expected = (11 // R) // P * P * K
    for epoch in range(3):
        id_sets = []
        for s in samplers:
            s.set_epoch(epoch)
            indices = list(s)
            assert len(indices) == len(s) == expected
            for batch in batches(indices, P * K):
                assert sorted(Counter(PIDS[i] for i in batch).values()) == [K] * P
            id_sets.append({PIDS[i] for i in indices})
        for a in range(R):
            for b in range(a + 1, R):
                assert not id_sets[a] & id_sets[b]


def test_distributed_single_replica_matches_pk_sampler() -> None:
    single = DistributedPKSampler(PIDS, 3, 2, num_replicas=1, rank=0, seed=4)
    plain = PKSampler(PIDS, 3, 2, seed=4)
    single.set_epoch(2)
    plain.set_epoch(2)
    assert list(single) == list(plain)


def test_distributed_ranks_share_the_identity_order() -> None:
    # Rank r takes ids r, r+R, ... of the shared shuffle: together they cover the first
    # R * num_groups * P ids of PKSampler's order for the same seed and epoch.
    P, K, R = 1, 2, 2
    plain = [PIDS[i] for i in list(PKSampler(PIDS, P, K, seed=9))[::K]]
    ranks = [
        [
            PIDS[i]
            for i in list(DistributedPKSampler(PIDS, P, K, num_replicas=R, rank=r, seed=9))[::K]
        ]
        for r in range(R)
    ]
    assert ranks[0] == plain[0:10:2] and ranks[1] == plain[1:10:2]


def test_distributed_errors() -> None:
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        DistributedPKSampler(PIDS, 2, 2)
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        DistributedPKSampler(PIDS, 2, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="split over 4 replicas cannot fill one group of P=3"):
        DistributedPKSampler(PIDS, 3, 2, num_replicas=4, rank=0)
