"""A small dict-in, dict-out REST client over the official client's configuration and transport.

The generated model classes are not used: the operator builds and reads plain JSON objects. Errors are
raised as ``ApiError`` with the HTTP status; ``classify`` turns them into kopf's retry semantics.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import kopf
import urllib3

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [root]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def refresh_kubeconfig_location() -> None:
    """Re-read ``KUBECONFIG``: the client library freezes its default path when first imported, which
    matters when one process runs the operator more than once (the end-to-end tests do)."""
    from kubernetes.config import kube_config

    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = os.environ.get("KUBECONFIG", "~/.kube/config")


def load_api_client() -> Any:
    """An ``ApiClient`` for in-cluster credentials, else the current kubeconfig context."""
    import kubernetes

    refresh_kubeconfig_location()
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


class Kube:
    def __init__(self, api_client: Any, timeout_s: float = 30.0) -> None:
        self._client = api_client
        self._timeout = timeout_s

    def request(self, method: str, resource_path: str, body: Any = None, content_type: str = JSON,
                query: Mapping[str, str] | None = None) -> Any:
        headers = {"Accept": JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self._client.param_serialize(
            method=method, resource_path=resource_path, query_params=list((query or {}).items()) or None,
            header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            response = self._client.call_api(*params, _request_timeout=self._timeout)
            response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, type(exc).__name__, str(exc)) from exc
        data = response.data or b""
        if not 200 <= response.status < 300:
            message = data.decode(errors="replace")
            reason = getattr(response, "reason", "") or ""
            try:
                status = json.loads(message)
                message, reason = status.get("message", message), status.get("reason", reason)
            except ValueError:
                pass
            raise ApiError(response.status, str(reason), str(message))
        return json.loads(data) if data else None

    def get(self, resource_path: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return self.request("GET", resource_path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, resource_path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        return list((self.request("GET", resource_path, query=query) or {}).get("items") or [])

    def create(self, resource_path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", resource_path, dict(body))

    def merge_patch(self, resource_path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", resource_path, dict(body), MERGE_PATCH)

    def json_patch(self, resource_path: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", resource_path, list(ops), JSON_PATCH)

    def delete(self, resource_path: str) -> None:
        """Delete the object; one that is already gone is not an error."""
        try:
            self.request("DELETE", resource_path, {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise


def classify(exc: ApiError, what: str) -> kopf.TemporaryError | kopf.PermanentError:
    """Map an API failure to kopf's retry semantics.

    409 (conflict, stale resourceVersion) and 422 from a JSON patch's failed ``test`` mean someone else
    changed the object first: re-read and retry soon. 400/422 on a create or plain patch means the
    object we built is invalid, which is the spec's fault: permanent. Everything else is transient.
    """
    if exc.status == 409:
        return kopf.TemporaryError(f"{what}: conflict, retrying ({exc.message})", delay=1)
    if exc.status in (400, 422):
        return kopf.PermanentError(f"{what}: rejected by the API server: {exc.message}")
    if exc.status in (401, 403):
        return kopf.TemporaryError(f"{what}: not permitted ({exc.message}); check the operator's RBAC",
                                   delay=60)
    if exc.status == 429:
        return kopf.TemporaryError(f"{what}: throttled", delay=10)
    return kopf.TemporaryError(f"{what}: {exc}", delay=5)
