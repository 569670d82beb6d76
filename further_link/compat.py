"""What differs between the aiohttp versions the package runs with.

Debian 12 / Raspberry Pi OS bookworm ship aiohttp 3.8 (the Debian package
depends on it); pip installs a current one. Only what 3.8 lacks is here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from aiohttp import web

T = TypeVar("T")


def app_key(name: str, kind: type[T]) -> web.AppKey[T]:
    """A typed application key (aiohttp >= 3.9); by name on aiohttp 3.8, which has no AppKey."""
    maker = getattr(web, "AppKey", None)
    if maker is None:
        return name  # type: ignore[return-value]
    key: web.AppKey[T] = maker(name, kind)
    return key


if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult as ResolveResult
else:
    try:
        from aiohttp.abc import ResolveResult
    except ImportError:  # aiohttp < 3.10 resolvers return plain dicts of the same keys
        ResolveResult = dict
