"""The dashboard's server accepts only its own origin and refuses to be framed, measured with real requests against
`streamlit run app/main.py`."""

import asyncio
import urllib.request

import pytest
import websockets

from app.server_guard import same_origin
from conftest import dashboard


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with dashboard(tmp_path_factory.mktemp("ws")) as url:
        yield url


def websocket_status(url: str, origin: str | None) -> int:
    """101 when the app's WebSocket opens for a page of `origin` (None: no Origin header), else the HTTP refusal."""

    async def attempt() -> int:
        headers = {"Origin": origin} if origin else {}
        target = url.replace("http://", "ws://") + "/_stcore/stream"
        try:
            async with websockets.connect(target, additional_headers=headers, subprotocols=["streamlit"]):
                return 101
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(attempt())


def test_the_dashboards_own_page_opens_the_websocket(server):
    assert websocket_status(server, server) == 101


@pytest.mark.parametrize("port_offset", [1, -1])
def test_a_page_on_another_local_port_is_refused_the_websocket(server, port_offset):
    host, port = server.rsplit(":", 1)
    assert websocket_status(server, f"{host}:{int(port) + port_offset}") == 403


@pytest.mark.parametrize(
    "origin",
    ["http://localhost", "https://attacker.example", "null", "file://", "http://127.0.0.1.evil.example"],
)
def test_a_page_of_any_other_origin_is_refused_the_websocket(server, origin):
    assert websocket_status(server, origin) == 403


@pytest.mark.parametrize("path", ["/", "/_stcore/health", "/app/static/missing.png"])
def test_no_response_of_the_server_may_be_framed(server, path):
    try:
        response = urllib.request.urlopen(server + path, timeout=30)
        headers = response.headers
    except urllib.error.HTTPError as exc:
        headers = exc.headers
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Content-Security-Policy"] == "frame-ancestors 'none'"


def test_same_origin_compares_scheme_host_and_port():
    assert same_origin("http://localhost:8501", "localhost:8501")
    assert not same_origin("http://localhost:8502", "localhost:8501")
    assert not same_origin("ftp://localhost:8501", "localhost:8501")
    assert not same_origin("http://localhost:8501", None)
    assert same_origin(None, "localhost:8501")  # a program, not a web page
