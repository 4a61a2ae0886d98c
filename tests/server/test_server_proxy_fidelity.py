"""What a client sends and gets through the sidecar equals what it would with the incumbent alone, down
to what HTTP libraries tend to fold: repeated headers, long header lines, cookies, credentials.

The incumbent here is a small aiohttp app that echoes what it received, so each test can compare the
two ends exactly; ``test_server_passthrough.py`` does the same against a real ``transformers serve``.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from baton_sidecar.config import RouterConfig


async def echo(request: web.Request) -> web.Response:
    """Every header as received, in order (repeated ones too); two Set-Cookie lines back."""
    resp = web.json_response({"headers": [[k, v] for k, v in request.headers.items()]})
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/")
    resp.headers.add("Link", "<https://example.com/" + "x" * 9000 + ">; rel=next")
    return resp


@pytest.fixture
def incumbent(server_thread):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, url = server_thread.start_app(app)
    yield url
    server_thread.stop_app(runner)


def exchange(base: str, headers: list[tuple[str, str]], path: str = "/echo") -> http.client.HTTPResponse:
    """A GET with exactly ``headers`` (names may repeat), as a raw HTTP/1.1 client sends them."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    resp.body = resp.read()
    conn.close()
    return resp


def received(resp: http.client.HTTPResponse) -> list[list[str]]:
    """What the incumbent received, less what belongs to one connection (hop by hop)."""
    return [[k.lower(), v] for k, v in json.loads(resp.body)["headers"] if k.lower() not in ("host", "connection")]


def sidecar_in_front(make_server, url: str) -> str:
    base, _ = make_server(router=RouterConfig(incumbent_url=url, baton_weight=0))
    return base


HEADERS = [("Cookie", "a=1"), ("Cookie", "b=2"), ("X-Dup", "one"), ("X-Dup", "two"), ("X-Big", "y" * 9000)]


def test_repeated_and_long_headers_pass_both_ways_as_they_do_directly(make_server, incumbent):
    direct = exchange(incumbent, HEADERS)
    through = exchange(sidecar_in_front(make_server, incumbent), HEADERS)
    assert through.status == direct.status == 200
    assert received(through) == received(direct)
    for name in ("Set-Cookie", "Link"):
        assert through.headers.get_all(name) == direct.headers.get_all(name)


def test_a_cookie_set_for_one_client_never_reaches_another(make_server, server_thread):
    """aiohttp's default cookie jar would keep the incumbent's Set-Cookie and send it on every later
    request, whoever made it (for an incumbent named by host name)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, url = server_thread.start_app(app)
    try:
        named = url.replace("127.0.0.1", "localhost")
        base = sidecar_in_front(make_server, named)
        assert exchange(base, [("Authorization", "Bearer alice")]).headers.get_all("Set-Cookie")
        bob = received(exchange(base, [("Authorization", "Bearer bob")]))
        assert not [v for k, v in bob if k == "cookie"]
    finally:
        server_thread.stop_app(runner)


def test_credentials_in_the_incumbent_url_yield_to_the_clients_own(make_server, incumbent):
    with_user = incumbent.replace("http://", "http://svc:s3cret@")
    base = sidecar_in_front(make_server, with_user)
    own = received(exchange(base, [("Authorization", "Bearer sk-client")]))
    assert [v for k, v in own if k == "authorization"] == ["Bearer sk-client"]
    none = received(exchange(base, []))
    assert [v for k, v in none if k == "authorization"] == ["Basic c3ZjOnMzY3JldA=="]  # svc:s3cret


def test_an_incumbent_url_with_a_query_is_refused_at_configuration():
    with pytest.raises(ValueError, match="incumbent_url"):
        RouterConfig(incumbent_url="http://incumbent:8000/?key=k")
