"""Extra IO: user programs import further_link and send camera frames."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import aiohttp
from PIL import Image

from conftest import Client, RunningServer

REPO = Path(__file__).resolve().parent.parent


def decode_frame(data: str) -> Image.Image:
    raw = base64.b64decode(data)
    assert raw[:2] == b"\xff\xd8", "frames are JPEG"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


async def test_version_inside_program_matches_server(
    client: Client, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.base_url + "/version") as response:
        served = (await response.json())["version"]
    result = await client.run(
        {"sourceScript": "import further_link\nprint(further_link.__version__)"}
    )
    assert result.stdout == f"{served}\n"


async def test_send_numpy_frame_end_to_end(client: Client) -> None:
    """Arrays are read as OpenCV gives them: blue, green, red; or 2-D greyscale."""
    script = (
        "import numpy as np, further_link\n"
        "frame = np.zeros((48, 64, 3), dtype=np.uint8)\n"
        "frame[:, :, 2] = 255\n"
        "further_link.send_image(frame)\n"
        "further_link.send_image(np.full((10, 20), 200, dtype=np.uint8))\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    assert len(result.frames) == 2
    image = decode_frame(result.frames[0])
    assert image.size == (64, 48)
    red, green, blue = image.getpixel((32, 24))
    assert red > 200 and green < 60 and blue < 60
    grey = decode_frame(result.frames[1]).convert("RGB")
    assert grey.size == (20, 10)
    assert all(190 < value < 210 for value in grey.getpixel((10, 5)))


async def test_send_pillow_image_and_jpeg_bytes(client: Client) -> None:
    script = (
        "import io, further_link\n"
        "from PIL import Image\n"
        "further_link.send_image(Image.new('L', (10, 20), 128))\n"
        "buffer = io.BytesIO()\n"
        "Image.new('RGB', (30, 40), 'blue').save(buffer, 'JPEG')\n"
        "further_link.send_image(buffer.getvalue())\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    assert [decode_frame(f).size for f in result.frames] == [(10, 20), (30, 40)]


async def test_frames_arrive_in_order_with_prints_and_before_stopped(client: Client) -> None:
    script = (
        "import numpy as np, further_link\n"
        "for i in range(5):\n"
        "    print('before', i)\n"
        "    further_link.send_image(np.full((8, 8, 3), i * 50, dtype=np.uint8))\n"
        "    print('after', i)\n"
    )
    result = await client.run({"sourceScript": script})
    # Output may be split or merged across messages; only the order matters.
    sequence = ""
    for message in result.messages:
        if message["type"] == "stdout":
            sequence += message["data"]["output"]
        elif message["type"] == "video":
            sequence += "[frame]"
    assert sequence == "".join(f"before {i}\n[frame]after {i}\n" for i in range(5))
    assert result.messages[-1]["type"] == "stopped"


async def test_send_image_outside_further_link_explains_itself(client: Client) -> None:
    script = (
        "import os, further_link\n"
        "del os.environ['FURTHER_LINK_IO_SOCKET']\n"
        "try:\n"
        "    further_link.send_image(b'\\xff\\xd8')\n"
        "except further_link.ChannelError as e:\n"
        "    print(e)\n"
    )
    result = await client.run({"sourceScript": script})
    assert "works only in a program started by further-link" in result.stdout


async def test_camera_example_streams_frames_until_stopped(client: Client) -> None:
    await client.send("start", {"sourcePath": str(REPO / "examples" / "camera.py")})
    await client.receive_type("started")
    frames = [await client.receive_type("video") for _ in range(3)]
    images = [decode_frame(frame["data"]["output"]) for frame in frames]
    assert {image.size for image in images} == {(320, 240)}
    # Away from the ball: blue is 128 everywhere and green grows downwards, so a
    # frame read with its channels swapped would show the red ramp as blue.
    for image in images:
        _, top_green, top_blue = image.getpixel((2, 2))
        _, bottom_green, bottom_blue = image.getpixel((2, 237))
        assert top_green < 30 and bottom_green > 220, image.getpixel((2, 237))
        assert 100 < top_blue < 156 and 100 < bottom_blue < 156
    await client.send("stop")
    assert (await client.receive_type("stopped"))["data"]["exitCode"] == -15
