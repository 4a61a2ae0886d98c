"""Leader election over a ``coordination.k8s.io/v1`` Lease: of several operator replicas, exactly one
reconciles at a time; the others wait, ready to take over.

The protocol is client-go's ``leaderelection``:

- a candidate takes the Lease when it has no holder, when it is already the holder, or when the Lease
  has not changed for ``leaseDurationSeconds`` as timed on the candidate's own monotonic clock (client-go's
  ``observedTime``): nodes' wall clocks are never compared, so a standby whose clock runs fast cannot
  take a live Lease. Every write carries the ``resourceVersion`` it read, so of two candidates racing for
  one Lease, one gets 409 and retries;
- the holder renews every ``retry_s``. One that has not renewed for ``renew_deadline_s`` (shorter than
  the lease), counted from the start of its last successful attempt, exits at once: by the time anyone
  else may take the Lease, it has stopped reconciling. One that finds another holder exits at once;
- a holder that stops cleanly releases the Lease, so a standby takes over without waiting it out.

Election calls run on a thread of their own, so that slow rollout work in the default executor never
delays a renewal.

kopf's own peering is not used: replicas of equal priority all freeze there, by design.

The operator (``handlers``) waits for the Lease in a startup handler, before kopf starts any watch,
daemon or timer; a standby therefore holds no state and starts from the cluster's objects (the rollout
resumes from ``status.rollout``). On by default in the chart and manifests (``BATON_LEADER_ELECTION``).
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from baton_operator.kube import ApiError, Kube, path

LEASES = ("coordination.k8s.io/v1", "leases")
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # a Lease's MicroTime
T = TypeVar("T")


class Attempt(enum.Enum):
    """What one try to take or renew the Lease found."""
    LEADING = "leading"  # this candidate holds the Lease now
    HELD = "held"  # another candidate holds it and renews it
    RACED = "raced"  # a write lost to a concurrent one (409): nothing is known, try again


@dataclass(frozen=True)
class ElectionSettings:
    namespace: str
    lease_name: str = "baton-operator"
    identity: str = ""
    lease_s: float = 15.0  # how long a holder that stopped renewing keeps the Lease
    renew_deadline_s: float = 10.0  # a holder unable to renew this long steps down (exits)
    retry_s: float = 2.0  # renewal period, and how often a standby looks again

    def __post_init__(self) -> None:
        if not 0 < self.retry_s < self.renew_deadline_s < self.lease_s:
            raise ValueError("leader election: need 0 < retry < renew deadline < lease duration "
                             f"(got {self.retry_s}, {self.renew_deadline_s}, {self.lease_s})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ElectionSettings | None":
        """None unless ``BATON_LEADER_ELECTION`` is true. The identity is the pod's name (``POD_NAME``,
        from the downward API) plus a per-process suffix, so a restarted container is a new candidate."""
        env = os.environ if env is None else env
        if env.get("BATON_LEADER_ELECTION", "").lower() not in ("1", "true", "yes"):
            return None
        namespace = env.get("BATON_LEADER_ELECTION_NAMESPACE") or env.get("POD_NAMESPACE") or _own_namespace()
        identity = f"{env.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        return cls(namespace=namespace, lease_name=env.get("BATON_LEADER_ELECTION_LEASE", "baton-operator"),
                   identity=identity,
                   lease_s=float(env.get("BATON_LEADER_ELECTION_LEASE_SECONDS", "15")),
                   renew_deadline_s=float(env.get("BATON_LEADER_ELECTION_RENEW_DEADLINE_SECONDS", "10")),
                   retry_s=float(env.get("BATON_LEADER_ELECTION_RETRY_SECONDS", "2")))


def _own_namespace() -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime(TIME_FORMAT)


def holder_of(lease: Mapping[str, Any] | None) -> str | None:
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or None


def lease_record(lease: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """The fields whose change shows that the holder is alive (client-go's LeaderElectionRecord)."""
    spec = (lease or {}).get("spec") or {}
    return tuple(spec.get(key) for key in ("holderIdentity", "leaseDurationSeconds", "acquireTime",
                                           "renewTime", "leaseTransitions"))


def is_free_for(lease: Mapping[str, Any] | None, identity: str, unchanged_for_s: float) -> bool:
    """Whether ``identity`` may take (or keep) the Lease, which this candidate has seen unchanged for
    ``unchanged_for_s`` seconds of its own clock."""
    holder = holder_of(lease)
    if not holder or holder == identity:
        return True
    duration = float(((lease or {}).get("spec") or {}).get("leaseDurationSeconds") or 0)
    return unchanged_for_s > duration


class LeaderElection:
    """One candidate. ``acquire`` returns once it leads; ``start_keeping`` renews until it cannot (then
    exits the process); ``release`` hands the Lease back on a clean stop. API calls run on the election's
    own thread (the client is synchronous), never on kopf's event loop."""

    def __init__(self, kube: Kube, settings: ElectionSettings, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube, self.settings, self.logger = kube, settings, logger
        self._collection = path(LEASES[0], LEASES[1], settings.namespace)
        self._path = f"{self._collection}/{settings.lease_name}"
        self._clock = clock
        self._seen: tuple[Any, ...] | None = None  # the Lease record last seen, and when (own clock)
        self._seen_at = 0.0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leader-election")
        self._renewed_at = 0.0  # loop time at the start of the last successful attempt

    def _unchanged_for(self, lease: Mapping[str, Any] | None) -> float:
        """Seconds since the Lease's record last changed, as far as this candidate has seen."""
        record, now = lease_record(lease), self._clock()
        if record != self._seen:
            self._seen, self._seen_at = record, now
        return now - self._seen_at

    def try_acquire(self) -> Attempt:
        """One attempt to take or renew the Lease."""
        now = datetime.datetime.now(datetime.timezone.utc)  # written for people; expiry uses _clock
        s = self.settings
        lease = self.kube.get(self._path)
        if not is_free_for(lease, s.identity, self._unchanged_for(lease)):
            return Attempt.HELD
        spec: dict[str, Any] = {"holderIdentity": s.identity, "leaseDurationSeconds": max(1, round(s.lease_s)),
                                "renewTime": format_time(now)}
        try:
            if lease is None:
                spec.update(acquireTime=format_time(now), leaseTransitions=0)
                self.kube.create(self._collection, {"apiVersion": LEASES[0], "kind": "Lease",
                                                    "metadata": {"name": s.lease_name}, "spec": spec})
                return Attempt.LEADING
            if holder_of(lease) != s.identity:
                transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0)
                spec.update(acquireTime=format_time(now), leaseTransitions=transitions + 1)
            self.kube.merge_patch(self._path, {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                                               "spec": spec})
            return Attempt.LEADING
        except ApiError as exc:
            if exc.status == 409:  # another write came first: another candidate, or anyone editing the Lease
                return Attempt.RACED
            raise

    async def _in_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def acquire(self) -> None:
        s = self.settings
        self.logger.info(f"waiting to lead: Lease {s.namespace}/{s.lease_name} as {s.identity}")
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                if await self._in_thread(self.try_acquire) is Attempt.LEADING:
                    self.logger.info(f"leading as {s.identity}")
                    self._renewed_at = started  # ``keep``'s deadline counts from here, as renewTime does
                    return
            except Exception as exc:  # the API unreachable or answering oddly: a standby just waits
                self.logger.warning(f"leader election: {exc!r}")
            await asyncio.sleep(s.retry_s)

    def start_keeping(self) -> "asyncio.Task[None]":
        """Run ``keep`` in a task; should it ever end other than by cancellation, step down."""
        task = asyncio.create_task(self.keep(), name="leader election")
        task.add_done_callback(self._kept)
        return task

    def _kept(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled():
            self._step_down(f"renewing stopped: {task.exception()!r}")

    async def keep(self) -> None:
        """Renew every ``retry_s``. Exit the process when another candidate holds the Lease, or when no
        attempt has succeeded for ``renew_deadline_s``, counted from the start of the last one that did
        (its ``renewTime`` is no later than that start). Failed attempts (API errors, 409s, timeouts) are
        retried until then, as client-go does."""
        s = self.settings
        loop = asyncio.get_running_loop()
        renewed_at = self._renewed_at
        while True:
            await asyncio.sleep(s.retry_s)
            started = loop.time()
            left = s.renew_deadline_s - (started - renewed_at)
            if left <= 0:
                self._step_down(f"no renewal for {s.renew_deadline_s:g} s")
            try:
                attempt = await asyncio.wait_for(self._in_thread(self.try_acquire), timeout=left)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.logger.warning(f"leader election: renewing failed: {exc!r}")
                continue
            if attempt is Attempt.LEADING:
                renewed_at = started
            elif attempt is Attempt.HELD:
                self._step_down("another candidate holds the Lease")

    def _step_down(self, why: str) -> None:
        self.logger.error(f"lost the Lease {self.settings.namespace}/{self.settings.lease_name} ({why}); "
                          f"exiting so that only the new leader reconciles")
        logging.shutdown()
        os._exit(1)  # no cleanup may run: it could still write to the cluster

    async def release_soon(self) -> None:
        """``release`` on the election's thread, after any renewal still in flight there."""
        await self._in_thread(self.release)

    def release(self, attempts: int = 3) -> None:
        """Give the Lease up if this candidate holds it (a clean stop), so a standby need not wait.
        A 409 is a write that came between the read and the release: read again and retry."""
        for _ in range(attempts):
            try:
                lease = self.kube.get(self._path)
                if holder_of(lease) != self.settings.identity:
                    return
                self.kube.merge_patch(self._path, {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": format_time(datetime.datetime.now(datetime.timezone.utc))}})
                self.logger.info("released the Lease")
                return
            except ApiError as exc:
                if exc.status != 409:
                    self.logger.warning(f"could not release the Lease: {exc}; it expires on its own")
                    return
        self.logger.warning("could not release the Lease: it kept changing; it expires on its own")
