"""Reading the small JSON bodies of ``POST /pair`` and ``POST /teacher``.

Such a body is read whole before anything is judged, so it is bounded in
size and in time (the connection's header clock stops while a request is
handled), and anything but a JSON object is a clear 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from further_link.errors import BodyError


async def read_json_object(
    request: web.Request, limit: int, timeout: float, usage: str
) -> dict[str, Any]:
    """The body parsed as a JSON object of at most ``limit`` bytes, arriving within
    ``timeout`` seconds.

    Raises ``BodyError`` with status 413 (over ``limit``), 408 (too slow) or
    400 (unreadable, not JSON, not an object); ``usage`` (what to send, e.g.
    ``'send JSON like {"code": "123456789"}'``) ends each 400 and 413 message.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, f"the body is over {limit} bytes; {usage}")
    try:
        raw = await asyncio.wait_for(request.content.read(limit + 1), timeout)
    except asyncio.TimeoutError:
        raise BodyError(408, f"the body did not arrive within {timeout:g} s") from None
    except (ConnectionError, ValueError) as exc:
        # aiohttp reports a broken chunked body or a body cut short as these.
        raise BodyError(
            400, f"the body could not be read ({type(exc).__name__}); {usage}"
        ) from None
    if len(raw) > limit:
        raise BodyError(413, f"the body is over {limit} bytes; {usage}")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8 and numbers too long to convert.
        raise BodyError(400, usage) from None
    if not isinstance(body, dict):
        raise BodyError(400, usage)
    return body
