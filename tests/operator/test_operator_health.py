"""The operator's probe endpoints (health.py): liveness and readiness from process start, leader or not."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from baton_operator.health import serve_health


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_liveness_and_readiness_answer_without_a_lease() -> None:
    address = f"127.0.0.1:{free_port()}"
    runner = await serve_health(address)  # nothing else started: a standby waiting for the Lease
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/readyz"):
                async with session.get(f"http://{address}{path}") as response:
                    assert response.status == 200 and (await response.json()) == {"status": "ok"}
            async with session.get(f"http://{address}/leader") as response:
                assert response.status == 404
    finally:
        await runner.cleanup()


def test_a_malformed_address_is_refused() -> None:
    with pytest.raises(ValueError, match="BATON_HEALTH_ADDRESS"):
        asyncio.run(serve_health("localhost"))
