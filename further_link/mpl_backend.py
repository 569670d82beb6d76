"""A matplotlib backend that shows a program's figures in the browser.

further-link starts every program with
``MPLBACKEND=module://further_link.mpl_backend``, so ``plt.show()`` needs no
change to the program: each open figure is rendered with Agg to a PNG and sent
over the run's side channel, which the server turns into a ``plot`` event
(figure number, PNG, size in pixels). A figure that is shown again replaces
the earlier picture of the same number in the page; an unchanged figure is not
sent twice, so ``plt.pause()`` loops send only frames that changed.

There is no window to wait for: ``plt.show()`` returns once the figures are
queued for the client, blocking or not. A program that picks another backend
itself (``matplotlib.use("TkAgg")``) keeps it. Imports only the standard
library and matplotlib.
"""

from __future__ import annotations

import io
import sys
import time
from typing import Any

from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

from further_link.channel import KIND_PLOT, PLOT_HEADER, ChannelError, _connection

# The PNG last sent per figure number: an unchanged figure is not sent again.
_sent: dict[int, bytes] = {}
_warned = False


def render_png(canvas: FigureCanvasAgg) -> bytes:
    """The figure as the page will show it: a PNG at the figure's own size and dpi."""
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def send_figure(manager: FigureManagerBase) -> None:
    """Send one figure to the client, unless it looks exactly as when last sent."""
    global _warned
    number = int(manager.num)
    png = render_png(manager.canvas)
    if _sent.get(number) == png:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # prints made before the plot reach the client first
    try:
        _connection.send(KIND_PLOT, PLOT_HEADER.pack(number) + png)
    except ChannelError as exc:
        if not _warned:
            _warned = True
            print(f"Warning: the plot cannot be shown: {exc}", file=sys.stderr)
        return
    _sent[number] = png


class FigureManager(FigureManagerBase):  # type: ignore[misc]
    def show(self) -> None:
        """``fig.show()``: send this figure."""
        send_figure(self)


class FigureCanvas(FigureCanvasAgg):  # type: ignore[misc]
    manager_class = FigureManager

    def draw_idle(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to refresh on screen: a figure is drawn when it is sent, once per frame."""

    def start_event_loop(self, timeout: float = 0) -> None:
        """``plt.pause(interval)`` waits ``interval``, not matplotlib's 10 ms steps."""
        if timeout > 0:
            time.sleep(timeout)
        else:
            super().start_event_loop(timeout)


def show(*args: Any, **kwargs: Any) -> None:
    """``plt.show()``: send every open figure that changed; never blocks."""
    for manager in Gcf.get_all_fig_managers():
        send_figure(manager)
