"""Issue 13's costs: how long a claim takes to pass from one run to the next, and how
long an attach takes to replay a full kept buffer (1 MiB) before live output.

Claim hand-off: the holder prints ``time.monotonic()`` as the last thing inside
its claim, the waiter as the first thing inside its own; the difference is what
a robot loses between two learners' programs (the clock is the same machine's).
Attach: from sending ``attach`` to the last replayed byte, against reading the
same megabyte live.
"""

from __future__ import annotations

import time

from _client import BenchClientError, collect_until_stopped, receive_event, send, wait_for_event
from _context import BenchContext
from _report import BenchResult, summarise

HANDOFF_ROUNDS = 20
ATTACH_ROUNDS = 5
TIMEOUT = 60.0
KEPT = 1024 * 1024

HOLDER = (
    "import time, further_link\n"
    "with further_link.claim('motors'):\n"
    "    print('held', flush=True)\n"
    "    input()\n"
    "    print('out', time.monotonic(), flush=True)\n"
)
WAITER = (
    "import time, further_link\n"
    "with further_link.claim('motors'):\n"
    "    print('in', time.monotonic(), flush=True)\n"
)
# A megabyte of output, then it waits: the kept buffer is full when the client leaves.
FILLER = (
    "import sys\n"
    "for _ in range(1024):\n"
    "    sys.stdout.write('x' * 1023 + '\\n')\n"
    "sys.stdout.flush()\n"
    "print('full', flush=True)\n"
    "input()\n"
)


def stamp(stdout: list[str], word: str) -> float:
    for line in "".join(stdout).splitlines():
        if line.startswith(word + " "):
            return float(line.split()[1])
    raise BenchClientError(f"no {word!r} line in the output")


async def bench_sharing(ctx: BenchContext) -> BenchResult:
    result = BenchResult("sharing")
    handoffs: list[float] = []
    attaches: list[float] = []
    async with ctx.serve(result) as served:
        for _ in range(HANDOFF_ROUNDS):
            async with served.client() as holder, served.client() as waiter:
                await send(holder, "start", sourceScript=HOLDER)
                await wait_for_event(holder, "started", TIMEOUT)
                kind, data = await receive_event(holder, TIMEOUT)
                if kind != "stdout" or not data["output"].startswith("held"):
                    raise BenchClientError(f"the holder said {kind} {data}")
                await send(waiter, "start", sourceScript=WAITER)
                await wait_for_event(waiter, "queued", TIMEOUT)
                await send(holder, "stdin", input="\n")
                held = await collect_until_stopped(holder, time.monotonic() + TIMEOUT)
                waited = await collect_until_stopped(waiter, time.monotonic() + TIMEOUT)
                handoffs.append(stamp(waited.stdout, "in") - stamp(held.stdout, "out"))
        for _ in range(ATTACH_ROUNDS):
            async with served.client() as first:
                await send(first, "start", sourceScript=FILLER, keepAlive=60)
                kind, data = await receive_event(first, TIMEOUT)
                run_id = data["runId"]
                text = ""
                while not text.endswith("full\n"):
                    kind, data = await receive_event(first, TIMEOUT)
                    text += data.get("output", "")
            async with served.client() as second:
                began = time.perf_counter()
                await send(second, "attach", runId=run_id)
                replayed = 0
                while replayed < KEPT:
                    kind, data = await receive_event(second, TIMEOUT)
                    replayed += len(data.get("output", ""))
                attaches.append(time.perf_counter() - began)
                await send(second, "stdin", input="\n")
                await collect_until_stopped(second, time.monotonic() + TIMEOUT)
    result.add("claim hand-off p50", sorted(handoffs)[len(handoffs) // 2] * 1000, "ms")
    result.add("claim hand-off max", max(handoffs) * 1000, "ms")
    result.add("attach, 1 MiB kept replayed p50", sorted(attaches)[len(attaches) // 2] * 1000, "ms")
    result.details.update(handoff=summarise(handoffs), attach_replay=summarise(attaches))
    return result
