"""A tiny RFB (VNC) client for tests: handshake, raw-encoded framebuffer updates, pixels.

It speaks RFB 3.8 over the device's websocket proxy exactly as noVNC does
(binary messages, chunked anyhow), with security type None, 32-bit
little-endian true colour and only the raw encoding, so the pixels read are
what x11vnc holds, not a decoder's guess.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import aiohttp
from PIL import Image

from conftest import TIMEOUT

SECURITY_NONE = 1
ENCODING_RAW = 0
MSG_FRAMEBUFFER_UPDATE = 0
MSG_COLOUR_MAP = 1
MSG_BELL = 2
MSG_CUT_TEXT = 3


@dataclass
class RfbClient:
    ws: aiohttp.ClientWebSocketResponse
    version: bytes = b""
    width: int = 0
    height: int = 0
    name: bytes = b""
    _buffer: bytearray = field(default_factory=bytearray)

    async def read(self, count: int, timeout: float = TIMEOUT) -> bytes:
        """Exactly ``count`` bytes of the RFB stream."""
        while len(self._buffer) < count:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
            assert message.type == aiohttp.WSMsgType.BINARY, f"expected RFB bytes, got {message!r}"
            self._buffer += message.data
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def handshake(self) -> None:
        """Version, security None, ClientInit (shared), ServerInit; then raw 32-bit pixels."""
        self._buffer = bytearray()
        self.version = await self.read(12)
        await self.ws.send_bytes(b"RFB 003.008\n")
        (count,) = struct.unpack("B", await self.read(1))
        assert count > 0, "the server refused the connection"
        types = await self.read(count)
        assert SECURITY_NONE in types, f"no password-less access offered: {list(types)}"
        await self.ws.send_bytes(bytes([SECURITY_NONE]))
        (result,) = struct.unpack(">I", await self.read(4))
        assert result == 0, "security handshake failed"
        await self.ws.send_bytes(b"\x01")  # shared
        self.width, self.height = struct.unpack(">HH", await self.read(4))
        await self.read(16)  # the server's pixel format; replaced below
        (name_length,) = struct.unpack(">I", await self.read(4))
        self.name = await self.read(name_length)
        # SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits each, BGRX.
        pixel_format = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        await self.ws.send_bytes(b"\x00\x00\x00\x00" + pixel_format)
        await self.ws.send_bytes(struct.pack(">BxHi", 2, 1, ENCODING_RAW))

    async def screen(self) -> Image.Image:
        """The whole framebuffer, asked for afresh (a non-incremental update)."""
        await self.ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, self.width, self.height))
        image = Image.new("RGB", (self.width, self.height))
        covered = 0
        while covered < self.width * self.height:
            (kind,) = struct.unpack("B", await self.read(1))
            if kind == MSG_FRAMEBUFFER_UPDATE:
                (rects,) = struct.unpack(">xH", await self.read(3))
                for _ in range(rects):
                    x, y, w, h, encoding = struct.unpack(">HHHHi", await self.read(12))
                    assert encoding == ENCODING_RAW, f"asked for raw pixels, got {encoding}"
                    pixels = await self.read(w * h * 4)
                    rect = Image.frombuffer("RGB", (w, h), pixels, "raw", "BGRX", 0, 1)
                    image.paste(rect, (x, y))
                    covered += w * h
            elif kind == MSG_BELL:
                continue
            elif kind == MSG_CUT_TEXT:
                (length,) = struct.unpack(">3xI", await self.read(7))
                await self.read(length)
            else:
                raise AssertionError(f"unexpected RFB server message {kind}")
        return image
