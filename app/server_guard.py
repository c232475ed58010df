"""The dashboard's server accepts only its own origin: a WebSocket opened by a page of any other origin (another local
port included) is refused, and no page may frame the dashboard (clickjacking of "Delete" or "Run this code")."""

from __future__ import annotations

from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NO_FRAMING = ((b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"))
POLICY_VIOLATION = 1008


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's `Origin` is the server's own (scheme http(s), host and port as the `Host` it reached);
    a request without `Origin` comes from a program, not a web page, and is let through."""
    if origin is None:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class SameOriginOnly:
    """ASGI middleware: WebSockets from another origin are closed before they open (HTTP 403), and every HTTP
    response forbids framing."""

    def __init__(self, app: Callable[[dict, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not same_origin(
            _header(scope, b"origin"), _header(scope, b"host")
        ):
            await receive()  # the websocket.connect message
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_unframed(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {key.lower() for key, _ in message.get("headers", ())}
                extra = [pair for pair in NO_FRAMING if pair[0] not in names]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_unframed)
