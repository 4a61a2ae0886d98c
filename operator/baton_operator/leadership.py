"""Leader election over a ``coordination.k8s.io/v1`` Lease: of several operator replicas, exactly one
reconciles at a time; the others wait, ready to take over.

The protocol is client-go's ``leaderelection``:

- a candidate takes the Lease when it has no holder, when its holder stopped renewing
  (``renewTime + leaseDurationSeconds`` has passed), or when it is already the holder. Every write carries
  the ``resourceVersion`` it read, so of two candidates racing for one Lease, one gets 409 and retries;
- the holder renews every ``retry_s``. One that cannot renew for ``renew_deadline_s`` (shorter than the
  lease) exits at once: by the time anyone else may take the Lease, it has stopped reconciling;
- a holder that stops cleanly releases the Lease, so a standby takes over without waiting it out.

kopf's own peering is not used: replicas of equal priority all freeze there, by design.

The operator (``handlers``) waits for the Lease in a startup handler, before kopf starts any watch,
daemon or timer; a standby therefore holds no state and starts from the cluster's objects (the rollout
resumes from ``status.rollout``). On by default in the chart and manifests (``BATON_LEADER_ELECTION``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from baton_operator.kube import ApiError, Kube, path

LEASES = ("coordination.k8s.io/v1", "leases")
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # a Lease's MicroTime


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


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    for layout in (TIME_FORMAT, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.datetime.strptime(text, layout).replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            continue
    return None


def holder_of(lease: Mapping[str, Any] | None) -> str | None:
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or None


def is_free_for(lease: Mapping[str, Any] | None, identity: str, now: datetime.datetime) -> bool:
    """Whether ``identity`` may take (or keep) the Lease at ``now``."""
    spec = (lease or {}).get("spec") or {}
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    if renewed is None:
        return True
    duration = float(spec.get("leaseDurationSeconds") or 0)
    return now > renewed + datetime.timedelta(seconds=duration)


class LeaderElection:
    """One candidate. ``acquire`` returns once it leads; ``keep`` renews until it cannot (then exits the
    process); ``release`` hands the Lease back on a clean stop. API calls run in threads (the client is
    synchronous), never on kopf's event loop."""

    def __init__(self, kube: Kube, settings: ElectionSettings, logger: logging.Logger) -> None:
        self.kube, self.settings, self.logger = kube, settings, logger
        self._collection = path(LEASES[0], LEASES[1], settings.namespace)
        self._path = f"{self._collection}/{settings.lease_name}"

    def try_acquire(self, now: datetime.datetime | None = None) -> bool:
        """One attempt to take or renew the Lease; False when another holder is live or a race was lost."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        s = self.settings
        lease = self.kube.get(self._path)
        if not is_free_for(lease, s.identity, now):
            return False
        spec: dict[str, Any] = {"holderIdentity": s.identity, "leaseDurationSeconds": max(1, round(s.lease_s)),
                                "renewTime": format_time(now)}
        try:
            if lease is None:
                spec.update(acquireTime=format_time(now), leaseTransitions=0)
                self.kube.create(self._collection, {"apiVersion": LEASES[0], "kind": "Lease",
                                                    "metadata": {"name": s.lease_name}, "spec": spec})
                return True
            if holder_of(lease) != s.identity:
                transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0)
                spec.update(acquireTime=format_time(now), leaseTransitions=transitions + 1)
            self.kube.merge_patch(self._path, {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                                               "spec": spec})
            return True
        except ApiError as exc:
            if exc.status == 409:  # another candidate wrote first
                return False
            raise

    async def acquire(self) -> None:
        s = self.settings
        self.logger.info(f"waiting to lead: Lease {s.namespace}/{s.lease_name} as {s.identity}")
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire):
                    self.logger.info(f"leading as {s.identity}")
                    return
            except ApiError as exc:
                self.logger.warning(f"leader election: {exc}")
            await asyncio.sleep(s.retry_s)

    async def keep(self) -> None:
        """Renew every ``retry_s``. Exit the process when another candidate holds the Lease, or after
        ``renew_deadline_s`` of failed renewals (the API unreachable)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        while True:
            await asyncio.sleep(s.retry_s)
            try:
                if await asyncio.wait_for(asyncio.to_thread(self.try_acquire), timeout=s.renew_deadline_s):
                    renewed_at = loop.time()
                    continue
                self._step_down("another candidate holds the Lease")
            except (ApiError, asyncio.TimeoutError) as exc:
                self.logger.warning(f"leader election: renewing failed: {exc!r}")
            if loop.time() - renewed_at >= s.renew_deadline_s:
                self._step_down(f"no renewal for {s.renew_deadline_s:g} s")

    def _step_down(self, why: str) -> None:
        self.logger.error(f"lost the Lease {self.settings.namespace}/{self.settings.lease_name} ({why}); "
                          f"exiting so that only the new leader reconciles")
        logging.shutdown()
        os._exit(1)  # no cleanup may run: it could still write to the cluster

    def release(self, attempts: int = 3) -> None:
        """Give the Lease up if this candidate holds it (a clean stop), so a standby need not wait.
        A 409 is a renewal that was still in flight when ``keep`` was cancelled: read again and retry."""
        for _ in range(attempts):
            lease = self.kube.get(self._path)
            if holder_of(lease) != self.settings.identity:
                return
            try:
                self.kube.merge_patch(self._path, {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": format_time(datetime.datetime.now(datetime.timezone.utc))}})
                self.logger.info("released the Lease")
                return
            except ApiError as exc:
                if exc.status != 409:
                    self.logger.warning(f"could not release the Lease: {exc}")
                    return
        self.logger.warning("could not release the Lease: it kept changing; it expires on its own")
