"""A pretend camera: draws a moving picture and sends it to the browser.

Run it with further-link (e.g. `{"type": "start", "data": {"sourcePath":
"/path/to/examples/camera.py"}}`); each frame arrives at the client as a
`video` message. No camera is needed: the picture is a colour gradient with a
ball bouncing across it. Stop it with a `stop` message, or let it finish.
"""

import math
import time

import numpy as np

import further_link

WIDTH, HEIGHT = 320, 240
FRAMES_PER_SECOND = 15
DURATION_SECONDS = 60


def draw(t: float) -> np.ndarray:
    """One frame (HEIGHT x WIDTH x 3, uint8) at time ``t`` seconds.

    Channels are blue, green, red, as OpenCV's camera frames (and so
    ``send_image``) have them: red grows to the right, green downwards.
    """
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    frame = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    frame[..., 0] = 128  # blue
    frame[..., 1] = ys * 255 // HEIGHT  # green
    frame[..., 2] = (xs * 255 // WIDTH + int(t * 40)) % 256  # red
    cx = WIDTH / 2 + math.sin(t * 2.0) * WIDTH / 3
    cy = HEIGHT / 2 + math.cos(t * 3.0) * HEIGHT / 3
    ball = (xs - cx) ** 2 + (ys - cy) ** 2 < 20**2
    frame[ball] = (255, 255, 255)
    return frame


def main() -> None:
    start = time.monotonic()
    for n in range(FRAMES_PER_SECOND * DURATION_SECONDS):
        further_link.send_image(draw(time.monotonic() - start))
        print(f"frame {n}")
        time.sleep(1 / FRAMES_PER_SECOND)


if __name__ == "__main__":
    main()
