"""Live configuration: the ``--config`` file (hot-reloaded) and PUT /baton/admin/config.

Effective configuration = start-up configuration (defaults, ``--policy``, command-line flags)
deep-merged with the file's sections; on every file change it is recomputed from the start-up
configuration, so deleting a key from the file reverts it. PUT /baton/admin/config deep-merges its body onto
the current effective configuration (a later file change recomputes from the file again).
``sla_classes`` is replaced as a whole, never merged, so a class can be removed.

A change is checked in full before anything is applied; a refused change keeps the previous
configuration and is counted in ``baton_config_reload_errors_total``. Policies reach the engine
through ``engine.apply_policy`` (between steps) and router changes affect only requests assigned
afterwards, so in-flight requests are never dropped or altered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from baton_sidecar.config import PolicyConfig, RouterConfig

log = logging.getLogger(__name__)

SECTIONS = ("policy", "router")
REPLACED_WHOLE = frozenset({"sla_classes"})


@dataclass(frozen=True)
class LiveConfig:
    policy: PolicyConfig
    router: RouterConfig

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "router": dataclasses.asdict(self.router)}


def parse_document(text: str | bytes, section: str | None = None) -> dict[str, Any]:
    """A YAML or JSON document with optional ``policy`` and ``router`` sections.

    With ``section``, the document is that section's content alone (a ``--policy`` file).
    """
    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise ValueError(f"config: not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if section is not None:
        data = {section: data}
    if not isinstance(data, dict):
        raise ValueError("config: must be a mapping with `policy` and/or `router` sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown section (expected policy, router)")
    for section in SECTIONS:
        if section in data and data[section] is not None and not isinstance(data[section], dict):
            raise ValueError(f"{section}: must be a mapping")
    return {k: v for k, v in data.items() if v is not None}


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
                and key not in REPLACED_WHOLE:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge(base: LiveConfig, document: Mapping[str, Any]) -> LiveConfig:
    """``base`` with ``document``'s sections merged in; ValueError naming the field if refused."""
    base_dict = base.to_dict()
    policy, router = base.policy, base.router
    try:
        if "policy" in document:
            policy = PolicyConfig.from_dict(deep_merge(base_dict["policy"], document["policy"]))
        if "router" in document:
            router = RouterConfig.from_dict(deep_merge(base_dict["router"], document["router"]))
    except (TypeError, AttributeError) as exc:  # a wrong shape that reached a constructor
        raise ValueError(f"config: {exc}") from None
    check_router(router)
    return LiveConfig(policy, router)


def check_router(router: RouterConfig) -> None:
    """Type checks ``RouterConfig`` leaves to its users."""
    if not isinstance(router.sticky_header, str):
        raise ValueError("router.sticky_header: must be a string")
    if not isinstance(router.fallback_to_baton, bool):
        raise ValueError("router.fallback_to_baton: must be a boolean")
    t = router.incumbent_timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError("router.incumbent_timeout_s: must be a number > 0")


class ConfigManager:
    """Owns the effective configuration and pushes changes to the engine and the router."""

    def __init__(self, startup: LiveConfig, apply_policy: Callable[[PolicyConfig], None],
                 apply_router: Callable[[RouterConfig], None],
                 on_result: Callable[[str, bool], None] = lambda source, ok: None) -> None:
        self.startup = startup
        self.current = startup
        self._apply_policy = apply_policy
        self._apply_router = apply_router
        self._on_result = on_result

    def _apply(self, new: LiveConfig, source: str) -> LiveConfig:
        if new.policy != self.current.policy:
            self._apply_policy(new.policy)
        if new.router != self.current.router:
            self._apply_router(new.router)
        self.current = new
        self._on_result(source, True)
        log.info("configuration applied from %s", source)
        return new

    def apply_file_text(self, text: str | bytes, section: str | None = None) -> LiveConfig:
        """Apply a watched file over the start-up configuration (``section``: the file holds only it)."""
        try:
            new = merge(self.startup, parse_document(text, section))
        except ValueError:
            self._on_result("file", False)
            raise
        return self._apply(new, "file")

    def apply_patch(self, document: Mapping[str, Any]) -> LiveConfig:
        try:
            new = merge(self.current, document)
        except ValueError:
            self._on_result("admin", False)
            raise
        return self._apply(new, "admin")


class FileWatcher:
    """Polls a config file's content (robust to ConfigMap symlink swaps and coarse mtimes)."""

    def __init__(self, path: str, manager: ConfigManager, interval_s: float = 1.0,
                 section: str | None = None) -> None:
        self.path = Path(path)
        self.section = section  # "policy" for a --policy file, None for a full config file
        self.manager = manager
        self.interval_s = interval_s
        self._digest: bytes | None = None
        self._task: asyncio.Task | None = None

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def load_initial(self) -> None:
        """Read and apply the file once, synchronously; a bad file at start-up is a hard error."""
        data = self._read()
        if data is None:
            raise ValueError(f"config: file {self.path} does not exist")
        self.manager.apply_file_text(data, self.section)
        self._digest = hashlib.sha256(data).digest()

    async def check(self) -> bool:
        """Apply the file if its content changed; True if something was applied."""
        data = await asyncio.to_thread(self._read)
        if data is None:  # mid-swap or removed: keep what is in force
            return False
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            self.manager.apply_file_text(data, self.section)
        except ValueError as exc:
            log.error("config file %s refused, previous configuration kept: %s", self.path, exc)
            return False
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # keep watching whatever one poll ran into
                log.exception("config file check failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def check_bearer(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def read_admin_token(env_value: str | None, token_file: str | None) -> str | None:
    """The admin token from a secret file (preferred) or the env; empty means disabled."""
    if token_file:
        token = Path(token_file).read_text().strip()
    else:
        token = (env_value or "").strip()
    return token or None


def decode_admin_body(raw: bytes) -> dict[str, Any]:
    """PUT /baton/admin/config body: JSON or YAML with the same sections as the file."""
    try:
        return parse_document(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("body: not UTF-8") from None

