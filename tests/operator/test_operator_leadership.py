"""Leader election (leadership.py) against an in-memory Lease with the API server's write rules: a
create of an existing object and a write carrying a stale resourceVersion both get 409."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any, Callable

import pytest

from baton_operator.kube import ApiError
from baton_operator.leadership import Attempt, ElectionSettings, LeaderElection, is_free_for

LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/baton-operator"


class LeaseStore:
    """One Lease, written as the API server would. ``before_write`` runs before each create or patch
    (to slow it down, fail it, or let someone else write first)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.before_write: Callable[[], None] = lambda: None
        self.gets = 0

    def get(self, path: str) -> dict[str, Any] | None:
        assert path == LEASE_PATH
        self.gets += 1
        return copy.deepcopy(self.lease)

    def create(self, collection: str, body: dict[str, Any]) -> dict[str, Any]:
        self.before_write()
        if self.lease is not None:
            raise ApiError(409, "AlreadyExists", "leases already exists")
        self.lease = copy.deepcopy(body)
        return self._stamp()

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.before_write()
        assert self.lease is not None
        if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        for key, value in body["spec"].items():
            if value is None:
                self.lease["spec"].pop(key, None)
            else:
                self.lease["spec"][key] = value
        return self._stamp()

    def edit(self, **spec: Any) -> None:
        """Someone else writes the Lease (another candidate, or a tool adding a label)."""
        assert self.lease is not None
        self.lease["spec"].update(spec)
        self._stamp()

    def _stamp(self) -> dict[str, Any]:
        self.version += 1
        self.lease.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SteppedDown(BaseException):
    """Stands in for ``os._exit``: a BaseException, so no ``except Exception`` can swallow it."""


def candidate(store: LeaseStore, identity: str, clock: Callable[[], float] = time.monotonic,
              lease_s: float = 15, renew_deadline_s: float = 10, retry_s: float = 2) -> LeaderElection:
    settings = ElectionSettings(namespace="ops", identity=identity, lease_s=lease_s,
                                renew_deadline_s=renew_deadline_s, retry_s=retry_s)
    election = LeaderElection(store, settings, logging.getLogger("test.leadership"), clock=clock)

    def step_down(why: str) -> None:
        election.stepped_down = why
        raise SteppedDown(why)
    election.stepped_down = None
    election._step_down = step_down
    return election


def lease(holder: str | None, duration: int = 15) -> dict:
    return {"spec": {"holderIdentity": holder, "leaseDurationSeconds": duration}}


@pytest.mark.parametrize("current, unchanged_for_s, free", [
    (None, 0, True),                  # no Lease yet
    (lease(None), 0, True),           # released
    (lease("me"), 0, True),           # mine: renew
    (lease("other"), 0, False),       # live holder
    (lease("other"), 14.9, False),
    (lease("other"), 15.1, True),     # unchanged for longer than its duration: the holder stopped
])
def test_lease_is_free_only_when_unheld_mine_or_unchanged_past_its_duration(current, unchanged_for_s, free) -> None:
    assert is_free_for(current, "me", unchanged_for_s) is free


def test_expiry_is_timed_on_the_candidates_own_clock_never_by_the_holders_timestamps() -> None:
    store, clock = LeaseStore(), Clock()
    leader, standby = candidate(store, "a"), candidate(store, "b", clock=clock)
    assert leader.try_acquire() is Attempt.LEADING
    # The leader's wall clock is an hour slow: its renewTime looks long expired to anyone comparing clocks.
    store.edit(renewTime="2020-01-01T00:00:00.000000Z")
    for _ in range(20):  # the holder keeps renewing every 2 s: the record changes, the standby waits
        assert standby.try_acquire() is Attempt.HELD
        clock.now += 2
        assert leader.try_acquire() is Attempt.LEADING
    assert store.lease["spec"]["holderIdentity"] == "a"
    # The leader stops. A standby takes over only once the record stayed the same for the lease's duration.
    assert standby.try_acquire() is Attempt.HELD
    clock.now += 15
    assert standby.try_acquire() is Attempt.HELD
    clock.now += 0.5
    assert standby.try_acquire() is Attempt.LEADING
    assert store.lease["spec"]["holderIdentity"] == "b" and store.lease["spec"]["leaseTransitions"] == 1


def test_a_new_candidate_waits_out_a_stale_lease_it_has_never_seen_change() -> None:
    store, clock = LeaseStore(), Clock()
    assert candidate(store, "gone").try_acquire() is Attempt.LEADING
    late = candidate(store, "late", clock=clock)
    assert late.try_acquire() is Attempt.HELD  # first sight: it cannot know how long ago that was renewed
    clock.now += 15.1
    assert late.try_acquire() is Attempt.LEADING


def test_two_candidates_racing_for_a_free_lease_one_wins_the_other_is_told_it_raced() -> None:
    store = LeaseStore()
    a, b = candidate(store, "a"), candidate(store, "b")
    assert a.try_acquire() is Attempt.LEADING
    store.edit(holderIdentity=None)  # released
    store.before_write = lambda: (setattr(store, "before_write", lambda: None), a.try_acquire())
    assert b.try_acquire() is Attempt.RACED  # a wrote between b's read and b's write
    assert store.lease["spec"]["holderIdentity"] == "a"


async def test_a_conflicting_write_does_not_unseat_the_leader() -> None:
    store = LeaseStore()
    leader = candidate(store, "a", lease_s=1.5, renew_deadline_s=1.0, retry_s=0.05)
    await leader.acquire()
    conflicts = 0

    def someone_labels_the_lease() -> None:  # every other write finds the Lease changed since it was read
        nonlocal conflicts
        if store.version % 2 == 1:
            conflicts += 1
            store.edit(note=conflicts)
    store.before_write = someone_labels_the_lease
    keeping = asyncio.create_task(leader.keep())
    await asyncio.sleep(1.5)  # longer than the renew deadline
    assert not keeping.done() and leader.stepped_down is None
    keeping.cancel()
    assert conflicts >= 3 and store.lease["spec"]["holderIdentity"] == "a"


async def test_a_leader_steps_down_when_another_holds_the_lease() -> None:
    store = LeaseStore()
    leader = candidate(store, "a", lease_s=1.5, renew_deadline_s=1.0, retry_s=0.05)
    await leader.acquire()
    store.edit(holderIdentity="b")
    with pytest.raises(SteppedDown, match="another candidate"):
        await leader.keep()


async def test_the_renew_deadline_counts_from_the_start_of_the_last_renewal_that_succeeded() -> None:
    """A renewal that takes 2 s and succeeds, then an API that hangs: the leader must be gone by the
    deadline after that renewal's start (its renewTime), not after its end, before a standby may lead."""
    store = LeaseStore()
    leader = candidate(store, "a", lease_s=6, renew_deadline_s=3, retry_s=0.2)
    await leader.acquire()
    starts: list[float] = []
    hang = False

    def slow_then_hung() -> None:
        starts.append(time.monotonic())
        time.sleep(2.0)
        while hang:
            time.sleep(0.05)
    store.before_write = slow_then_hung
    keeping = asyncio.create_task(leader.keep())
    while len(starts) < 1:
        await asyncio.sleep(0.01)
    hang = True  # the first attempt (under way) succeeds after 2 s; every later one hangs
    with pytest.raises(SteppedDown, match="no renewal"):
        await asyncio.wait_for(keeping, 10)
    stepped_down_after = time.monotonic() - starts[0]
    hang = False
    # Counting from the end would give >= 2 + 3 s; from the start, 3 s plus scheduling.
    assert 3.0 <= stepped_down_after < 4.5, stepped_down_after


async def test_unexpected_errors_are_retried_until_the_deadline_then_the_leader_steps_down() -> None:
    store = LeaseStore()
    leader = candidate(store, "a", lease_s=1.5, renew_deadline_s=0.6, retry_s=0.05)
    await leader.acquire()

    def garbled() -> None:
        raise ValueError("Expecting value: line 1 column 1")  # e.g. a body that is not JSON
    store.before_write = garbled
    with pytest.raises(SteppedDown, match="no renewal"):
        await asyncio.wait_for(leader.keep(), 5)


async def test_renewing_that_ends_other_than_by_cancellation_steps_down() -> None:
    leader = candidate(LeaseStore(), "a")

    async def broken() -> None:
        raise RuntimeError("bug")
    task = asyncio.create_task(broken())
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(SteppedDown, match="RuntimeError"):
        leader._kept(task)
    cancelled = asyncio.create_task(asyncio.sleep(10))
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    leader._kept(cancelled)  # a clean stop: nothing happens
    assert leader.stepped_down == "renewing stopped: RuntimeError('bug')"


async def test_release_hands_the_lease_back_and_survives_an_api_error() -> None:
    store = LeaseStore()
    leader = candidate(store, "a")
    await leader.acquire()
    await leader.release_soon()
    assert "holderIdentity" not in store.lease["spec"] and store.lease["spec"]["leaseDurationSeconds"] == 1

    def unavailable(path: str) -> None:
        raise ApiError(503, "ServiceUnavailable", "etcd is down")
    store.get = unavailable
    leader.release()  # logs, does not raise: the Lease expires on its own


async def test_a_stopping_leader_releases_only_after_its_threads_api_calls_end() -> None:
    """kopf cancels a rollout daemon's coroutine, not the thread running its API call: that write must
    land before the Lease is released, never after a new leader's."""
    import kopf

    from baton_operator import handlers

    store = LeaseStore()
    memo = kopf.Memo()
    memo.election = candidate(store, "a")
    assert memo.election.try_acquire() is Attempt.LEADING
    memo.keeping_lead = asyncio.create_task(asyncio.sleep(60))
    writes: list[tuple[str, float]] = []
    release = memo.election.release

    def late_write() -> None:  # an API call under way when the daemon was cancelled
        time.sleep(0.5)
        writes.append(("daemon", time.monotonic()))
    memo.election.release = lambda: (release(), writes.append(("release", time.monotonic())))
    pending = asyncio.ensure_future(asyncio.to_thread(late_write))
    await asyncio.sleep(0.05)
    pending.cancel()
    await handlers.step_aside(memo=memo, logger=logging.getLogger("test.leadership"))
    assert [who for who, _ in writes] == ["daemon", "release"]
    assert "holderIdentity" not in store.lease["spec"]
