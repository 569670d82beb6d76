"""further-link: run a learner's Python program on this device from a browser.

Inside a program started by further-link, ``import further_link`` gives the
helpers for richer output, e.g. ``further_link.send_image(frame)``. This module
imports only the standard library so that the import stays fast.
"""

from further_link.channel import ChannelError, send_image
from further_link.controls import Button, Slider, button, slider
from further_link.keyboard import KeyboardButton
from further_link.sharing import ClaimError, ClaimTimeout, claim

# further-link's own release: the package version, `further-link --version`.
PACKAGE_VERSION = "0.1.0"
# The Further-Link API level this release speaks (upstream 5.11.2's /run, keys and
# upload): what GET /version reports, so that Further's minimum-version checks pass,
# and what programs written for upstream compare.
__version__ = "5.11.2"
__all__ = [
    "PACKAGE_VERSION",
    "Button",
    "ChannelError",
    "ClaimError",
    "ClaimTimeout",
    "KeyboardButton",
    "Slider",
    "__version__",
    "button",
    "claim",
    "send_image",
    "slider",
]
