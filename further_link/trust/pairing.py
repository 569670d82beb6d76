"""How much guessing pairing allows, device-wide, and when the code changes.

A wrong code costs the same wherever it comes from: one device-wide budget
(a bucket of ``BURST`` wrong codes that refills at ``REFILL_PER_DAY`` a day,
so no 24 hours hold more than ``BURST + REFILL_PER_DAY`` wrong codes), one
judgement at a time (a code is judged only after its whole body arrived and
parsed, under a lock held ``HOLD_SECONDS`` after each wrong code), and a new
code after ``WRONG_PER_CODE`` wrong ones. README's Security section turns
these numbers into the odds of an attacker pairing. The code's generation is
kept in the config dir so ``further-link token`` shows the same code as the
log. Nothing here touches sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from further_link.trust.secretfile import write_secret

log = logging.getLogger(__name__)

GENERATION_FILE = "pairing-generation"
BURST = 100
REFILL_PER_DAY = 300
WRONG_PER_CODE = 10
HOLD_SECONDS = 0.1
DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class PairingPolicy:
    """The numbers README's arithmetic rests on (tests may shrink the hold)."""

    burst: int = BURST
    refill_per_day: int = REFILL_PER_DAY
    wrong_per_code: int = WRONG_PER_CODE
    hold_seconds: float = HOLD_SECONDS

    @property
    def wrong_per_day(self) -> int:
        """At most this many wrong codes are judged in any 24 hours."""
        return self.burst + self.refill_per_day


class PairingSpent(Exception):
    """The device-wide budget of wrong codes is spent for now."""

    def __init__(self, seconds_left: float) -> None:
        super().__init__(f"pairing budget spent for {seconds_left:.0f} s")
        self.seconds_left = seconds_left


def read_generation(config_dir: Path) -> int:
    """The pairing code's generation (0 when no budget was ever spent)."""
    try:
        text = (config_dir / GENERATION_FILE).read_text(encoding="ascii").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() and len(text) < 19 else 0


class PairingGuard:
    """The device-wide budget of wrong codes; use ``judging()`` around each judgement."""

    def __init__(self, config_dir: Path | None, policy: PairingPolicy | None = None) -> None:
        """``config_dir``: where the generation is kept; None keeps it in memory only.

        A server that dropped root passes None: the config dir is root's alone
        (`further-link token` asks that server over the control socket instead).
        """
        self.policy = policy or PairingPolicy()
        self._config_dir = config_dir
        self._lock = asyncio.Lock()
        self._tokens = float(self.policy.burst)
        self._updated = time.monotonic()
        self._wrong_this_code = 0
        self.generation = 0 if config_dir is None else read_generation(config_dir)

    @contextlib.asynccontextmanager
    async def judging(self) -> AsyncIterator[None]:
        """Hold the device-wide lock; raise ``PairingSpent`` when no wrong code may be judged."""
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                rate = self.policy.refill_per_day / DAY_SECONDS
                raise PairingSpent((1 - self._tokens) / rate if rate > 0 else DAY_SECONDS)
            yield

    def _refill(self) -> None:
        now = time.monotonic()
        rate = self.policy.refill_per_day / DAY_SECONDS
        self._tokens = min(float(self.policy.burst), self._tokens + (now - self._updated) * rate)
        self._updated = now

    async def wrong(self) -> bool:
        """Spend one wrong code (call inside ``judging``); True when the code changed."""
        self._tokens -= 1
        self._wrong_this_code += 1
        changed = False
        if self._wrong_this_code >= self.policy.wrong_per_code:
            self._wrong_this_code = 0
            self.generation += 1
            changed = True
            if self._config_dir is not None:
                try:
                    write_secret(
                        self._config_dir / GENERATION_FILE, f"{self.generation}\n".encode()
                    )
                except OSError as exc:
                    log.warning(
                        "pairing code generation %d kept in memory only: %s",
                        self.generation,
                        exc.strerror,
                    )
        # Held while judging: wrong codes are judged one at a time, this far apart.
        await asyncio.sleep(self.policy.hold_seconds)
        return changed

    def succeeded(self) -> None:
        self._wrong_this_code = 0
