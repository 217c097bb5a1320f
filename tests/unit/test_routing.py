"""Each routing policy on fake workers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.schemas import OpenAICall, validate_call
from gateway.workers.pool import Worker
from gateway.workers.routing import PowerOfTwo, PrefixAware, SessionAffinity, make_policy
from gateway.workers.routing.prefix_aware import PrefixIndex, block_hashes


def _workers(count: int) -> list[Worker]:
    return [Worker(f"http://w{i}:8100", healthy=True) for i in range(count)]


def _chat(text: str, user: str | None = None, session: str | None = None) -> OpenAICall:
    body: dict[str, object] = {"model": "demo", "messages": [{"role": "user", "content": text}]}
    if user is not None:
        body["user"] = user
    return validate_call("chat", body, session)


def _load(worker: Worker) -> float:
    return float(worker.in_flight)


def test_round_robin_cycles_through_every_worker() -> None:
    workers = _workers(3)
    policy = make_policy("round_robin", _load)
    picks = [policy.choose(workers, _chat("x")).url for _ in range(6)]
    assert picks == [w.url for w in workers] * 2


def test_least_loaded_takes_the_emptiest_worker() -> None:
    workers = _workers(3)
    workers[0].in_flight, workers[1].in_flight, workers[2].in_flight = 5, 1, 3
    assert make_policy("least_loaded", _load).choose(workers, _chat("x")) is workers[1]


def test_least_loaded_counts_the_workers_waiting_queue_through_load_of() -> None:
    workers = _workers(2)
    waiting = {workers[0].url: 10.0, workers[1].url: 0.0}
    workers[1].in_flight = 3
    policy = make_policy("least_loaded", lambda w: w.in_flight + waiting[w.url])
    assert policy.choose(workers, _chat("x")) is workers[1]


def test_power_of_two_never_picks_the_more_loaded_of_its_pair() -> None:
    workers = _workers(2)
    workers[0].in_flight = 9
    policy = PowerOfTwo(_load, random.Random(7))
    assert {policy.choose(workers, _chat("x")).url for _ in range(50)} == {workers[1].url}


def test_power_of_two_spreads_load_over_many_workers() -> None:
    workers = _workers(8)
    policy = PowerOfTwo(_load, random.Random(1))
    for _ in range(800):
        policy.choose(workers, _chat("x")).in_flight += 1
    counts = [w.in_flight for w in workers]
    assert max(counts) - min(counts) <= 6


def test_session_affinity_keeps_a_session_on_one_worker() -> None:
    workers = _workers(4)
    policy = SessionAffinity(_load)
    for session in ("alice", "bob", "carol"):
        picks = {policy.choose(workers, _chat("x", session=session)).url for _ in range(10)}
        assert len(picks) == 1
    assert policy.choose(workers, _chat("x", user="dave")) is policy.choose(workers, _chat("y", user="dave"))


def test_session_affinity_moves_few_sessions_when_a_worker_leaves() -> None:
    workers = _workers(5)
    policy = SessionAffinity(_load)
    sessions = [f"user-{i}" for i in range(2000)]
    before = {s: policy.choose(workers, _chat("x", session=s)).url for s in sessions}
    after = {s: policy.choose(workers[:-1], _chat("x", session=s)).url for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(before[s] == workers[-1].url for s in moved), "only the departed worker's sessions move"
    assert 0.1 < len(moved) / len(sessions) < 0.3


def test_session_affinity_spreads_sessions_evenly() -> None:
    workers = _workers(4)
    policy = SessionAffinity(_load)
    counts = Counter(policy.choose(workers, _chat("x", session=f"s{i}")).url for i in range(4000))
    assert min(counts.values()) > 700


def test_prefix_aware_sends_a_shared_prefix_back_to_the_same_worker() -> None:
    workers = _workers(3)
    policy = PrefixAware(_load, block_chars=16)
    system = "You are a careful assistant. " * 20
    first = policy.choose(workers, _chat(system + "question one"))
    first.in_flight += 1  # it is now the busier one, yet within the imbalance bound
    again = policy.choose(workers, _chat(system + "another question"))
    assert again is first


def test_prefix_aware_falls_back_to_least_loaded_when_the_match_is_overloaded() -> None:
    workers = _workers(2)
    policy = PrefixAware(_load, block_chars=16, max_imbalance=2)
    prompt = "shared context " * 40
    owner = policy.choose(workers, _chat(prompt))
    owner.in_flight = 10
    other = policy.choose(workers, _chat(prompt))
    assert other is not owner
    # The other worker learned the prefix too, so it can take the popular prompt from now on.
    owner.in_flight = 0
    assert policy.indexes[other.url].matched_blocks(block_hashes(_chat(prompt).prefix_text(), 16, 256)) > 0


def test_prefix_aware_does_not_starve_a_worker_under_one_hot_prefix() -> None:
    workers = _workers(3)
    policy = PrefixAware(_load, block_chars=16, max_imbalance=4)
    prompt = "the one system prompt everybody shares " * 10
    open_requests: list[Worker] = []
    for step in range(300):
        worker = policy.choose(workers, _chat(prompt + str(step)))
        worker.in_flight += 1
        open_requests.append(worker)
        if len(open_requests) > 12:  # requests finish as new ones arrive
            open_requests.pop(0).in_flight -= 1
    assert all(w.in_flight > 0 for w in workers), [w.in_flight for w in workers]


def test_prefix_index_memory_is_bounded_whatever_the_traffic() -> None:
    index = PrefixIndex(capacity=1000)
    for i in range(5000):
        index.remember(block_hashes(f"unique prompt number {i} " * 30, 32, 256))
    assert len(index) == 1000


def test_block_hashes_chain_so_a_block_stands_for_its_whole_prefix() -> None:
    a = block_hashes("A" * 64 + "B" * 64, 64, 10)
    b = block_hashes("C" * 64 + "B" * 64, 64, 10)
    assert len(a) == 2 and a[1] != b[1]
    assert block_hashes("short", 64, 10) == []


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random_walk", _load)
