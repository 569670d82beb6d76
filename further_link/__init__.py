"""further-link: run a learner's Python program on this device from a browser.

Inside a program started by further-link, ``import further_link`` gives the
helpers for richer output, e.g. ``further_link.send_image(frame)``. This module
imports only the standard library so that the import stays fast.
"""

from .channel import ChannelError, send_image
from .keyboard import KeyboardButton

__version__ = "0.1.0"
__all__ = ["ChannelError", "KeyboardButton", "__version__", "send_image"]
