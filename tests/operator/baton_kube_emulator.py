"""A Kubernetes API emulator for the operator's end-to-end tests: kmock plus the server-side behaviour
the operator and kubectl rely on, in a background thread on a loopback port.

kmock 0.8 stores objects and serves discovery, CRUD and watches, but leaves out what a real API server
adds. Filled in here:

- uid, resourceVersion (one counter for all objects), generation (bumped when ``spec`` changes),
  creationTimestamp, metadata.namespace from the URL, names from ``generateName``;
- optimistic concurrency: a merge patch carrying a stale ``metadata.resourceVersion`` gets 409;
  a JSON patch whose ``test`` op fails (or that cannot apply) gets 422, not 500;
- lists carry ``kind``/``apiVersion``/``resourceVersion``; the core group's discovery says ``v1`` (not
  ``/v1``, which kubectl rejects); subresources in discovery carry no short names.

Still not emulated (the tests do not depend on them): admission (OpenAPI schemas, CEL rules, defaults),
garbage collection through ownerReferences, strategic merge of lists (a strategic merge patch is applied
as a JSON merge patch), controllers (the tests play the Deployment controller), RBAC, watch bookmarks
and resourceVersion-based resumption (a reconnecting watch replays every object as ADDED).

Only kmock's public API is used: ``kmock.KubernetesEmulator`` and its ``objects``, subclassed the way its
docstring invites ("inherit and implement for your cases") by overriding its request hooks (``_handle``,
``_serve_list``, ``_serve_version``). The merge-patch semantics are our own (``merge_patch``), not
imported from kmock's internals.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import secrets
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
import yaml

CREATE, UPDATE, DELETE, LIST = kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE, kmock.action.LIST


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, into a copy: mappings merge key by key, ``None`` deletes a key, anything
    else replaces. The emulator computes the result only to tell whether ``spec`` changed (``generation``);
    kmock applies the patch to the stored object itself, with the same semantics for mappings. The CEL
    tests build their objects with it too."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}  # a copy: callers keep their input
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class BatonEmulator(kmock.KubernetesEmulator):
    _versions = itertools.count(1000)

    def _next_version(self) -> str:
        return str(next(self._versions))

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None:
            if request.action == CREATE and isinstance(request.data, dict):
                self._on_create(request)
            elif request.action == UPDATE and request.name is not None:
                self._on_update(request)
            elif request.action == DELETE and request.name is not None:
                self._on_delete(request)
        return await super()._handle(request)

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _on_create(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_version(), generation=1,
                    creationTimestamp=_now())
        meta.pop("deletionTimestamp", None)

    def _on_update(self, request: kmock.Request) -> None:
        current = self._stored(request)
        if current is None:
            return  # kmock answers 404 itself
        patch = request.data
        try:
            if isinstance(patch, list):
                updated = jsonpatch.apply_patch(current, patch, in_place=False)
            elif isinstance(patch, dict):
                sent = (patch.get("metadata") or {}).get("resourceVersion")
                if sent is not None and sent != current["metadata"].get("resourceVersion"):
                    raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                        "Operation cannot be fulfilled: the object has been modified; "
                        "please apply your changes to the latest version and try again"))
                updated = merge_patch(current, patch)
            else:
                return
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        stamp: dict[str, Any] = {"resourceVersion": self._next_version()}
        if request.subresource is None and updated.get("spec") != current.get("spec"):
            stamp["generation"] = int(current["metadata"].get("generation") or 1) + 1
        if isinstance(patch, list):
            patch.extend({"op": "add", "path": f"/metadata/{key}", "value": value} for key, value in stamp.items())
        else:
            patch.setdefault("metadata", {}).update(stamp)

    def _on_delete(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            # The deletion mark is a change like any other; stamp it silently, kmock emits the event.
            self.objects[key].patch({"metadata": {"resourceVersion": self._next_version()}})

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        info = self.resources[request.resource]
        group_version = (f"{request.resource.group}/{request.resource.version}" if request.resource.group
                         else request.resource.version)
        return {"apiVersion": group_version, "kind": f"{info.kind}List",
                "metadata": {"resourceVersion": str(next(self._versions))}, "items": payload["items"]}

    async def _serve_version(self, request: kmock.Request) -> Any:
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")  # kmock says "/v1" for the core group
        for entry in payload.get("resources", []):
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
        return payload


def declare_crds(emulator: kmock.KubernetesEmulator, crd_paths: list[Path]) -> None:
    """Make custom resources discoverable from their CRD manifests (kmock has no CRD controller)."""
    for crd_path in crd_paths:
        for crd in yaml.safe_load_all(crd_path.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                emulator.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = \
                    kmock.ResourceInfo(
                        kind=spec["names"]["kind"], singular=spec["names"]["singular"],
                        namespaced=spec["scope"] == "Namespaced",
                        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                        shortnames=set(spec["names"].get("shortNames", [])),
                        categories=set(spec["names"].get("categories", [])),
                        subresources=set(version.get("subresources", {})))


class EmulatorThread:
    """Runs a BatonEmulator on 127.0.0.1 (random port) in its own thread and event loop."""

    def __init__(self, crd_paths: list[Path]) -> None:
        self._crd_paths = crd_paths
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.url = ""

    def __enter__(self) -> "EmulatorThread":
        self._thread.start()
        if not self._ready.wait(timeout=15):
            raise RuntimeError("the Kubernetes emulator did not start in 15 s")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with BatonEmulator() as emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            with warnings.catch_warnings():  # kmock's own use of a deprecated importlib API
                warnings.simplefilter("ignore", DeprecationWarning)
                emulator.resources.load_bundled()
            declare_crds(emulator, self._crd_paths)
            self.url = f"http://127.0.0.1:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def kubeconfig(self, namespace: str) -> str:
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                          "namespace": namespace}}],
            "current-context": "emulator",
        })
