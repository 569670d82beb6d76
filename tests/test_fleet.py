"""A lesson with thirty real devices on loopback: found with mDNS (announced and
browsed through zeroconf on 127.0.0.1's interface only, so nothing leaves this
machine) and with a device list; paired with the teacher's key; a project
pushed and run everywhere; one console watched and typed into; everything
stopped; the class locked against a learner's own page and unlocked; a
killed device shown offline and then back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from fleetkit import (
    ClassDevice,
    Consoles,
    Teacher,
    class_prefix,
    eventually,
    further_link,
    start_class,
    start_device,
    start_teacher,
    stop_class,
    watch_events,
)

from conftest import AS_ROOT, TIMEOUT, Client, RunningServer
from v5client import V5Client, run_url

# The servers announce themselves from `further-link serve` (cli.serve), which the
# fixture runs as real processes only as root (as CI does).
pytestmark = pytest.mark.skipif(not AS_ROOT, reason="the class's servers are real processes")

CLASS_SIZE = 30
UNANNOUNCED = 1  # found through the device list file only
LESSON = {
    "greeting.txt": "hello from the teacher\n",
    "main.py": (
        "import socket, time\n"
        "print(open('greeting.txt').read().strip(), flush=True)\n"
        "line = input()\n"
        "print('got', line, flush=True)\n"
        "while True:\n"
        "    time.sleep(0.5)\n"
        "    print('tick', flush=True)\n"
    ),
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def write_project(where: Path) -> Path:
    project = where / "lesson1"
    project.mkdir()
    for name, text in LESSON.items():
        (project / name).write_text(text)
    return project


async def learner(http: aiohttp.ClientSession, server: RunningServer) -> Client:
    """A learner's own page on the device: /run-py with the device token."""
    return Client(await http.ws_connect(server.ws_url()))


async def test_a_lesson_with_thirty_devices(sandbox: Path, http: aiohttp.ClientSession) -> None:
    teacher_dir = sandbox / "teacher"
    code, said = await further_link(teacher_dir, "teacher-key")
    assert code == 0, said
    public_key = said.split()[0]
    prefix = class_prefix()
    devices = await start_class(sandbox, prefix, CLASS_SIZE, public_key, UNANNOUNCED)
    teacher: Teacher | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        listed = devices[-1]
        (teacher_dir / "devices.txt").write_text(
            "# devices on a network without multicast\n"
            f"http://127.0.0.1:{listed.port} {listed.name}\n"
        )
        names = {d.name for d in devices}
        class_flags = ("--interface", "127.0.0.1", "--match", f"{prefix}-*")

        # `further-link devices`: every device, within its 2 s of listening.
        async def all_listed() -> bool:
            began = time.monotonic()
            code, said = await further_link(teacher_dir, "devices", *class_flags)
            listening = time.monotonic() - began
            found = {line.split()[0] for line in said.splitlines()[1:] if line.strip()}
            all_lines.append((listening, said))
            return code == 0 and found == names

        all_lines: list[tuple[float, str]] = []
        await eventually(all_listed, "`further-link devices` lists the whole class", every=1.0)
        said = all_lines[-1][1]
        for device in devices:
            line = next(line for line in said.splitlines() if line.startswith(device.name + " "))
            assert f"127.0.0.1:{device.port}" in line
            assert " no " in line, line  # not paired yet
            assert line.endswith("list" if device is listed else "mdns"), line

        # The teacher's tool pairs every device with the teacher key: no code typed anywhere.
        teacher = await start_teacher(teacher_dir, http, *class_flags)

        async def class_ready() -> bool:
            state = await teacher.devices()
            return set(state) == names and all(
                d["online"] and d["paired"] and d["version"] for d in state.values()
            )

        paired_in = await eventually(class_ready, "every device online and paired")
        print(f"30 devices found and paired in {paired_in:.1f} s")
        code, said = await further_link(teacher_dir, "devices", *class_flags)
        assert said.count(" yes ") == CLASS_SIZE, said

        consoles = Consoles()
        watched = devices[3].name
        watcher = asyncio.ensure_future(watch_events(teacher, watched, consoles))

        # Push the project, then run it everywhere.
        project = write_project(sandbox)
        code, said = await further_link(teacher_dir, "class", "push", str(project))
        assert code == 0 and f"push: {CLASS_SIZE} of {CLASS_SIZE} devices" in said, said
        pushed = devices[7].server.config.work_dir / "lesson1" / "greeting.txt"
        assert pushed.read_text() == LESSON["greeting.txt"]
        code, said = await further_link(teacher_dir, "class", "run", str(project))
        assert code == 0 and f"run: {CLASS_SIZE} of {CLASS_SIZE} devices" in said, said
        state = await teacher.devices()
        assert {d["running"] for d in state.values()} == {"lesson1/main.py"}

        # Every console shows the program's first line; the watched one gets input.
        async def greeted() -> bool:
            return all("hello from the teacher" in consoles.text.get(name, "") for name in names)

        await eventually(greeted, "every console shows the greeting")
        await teacher.api("/api/stdin", {"device": watched, "text": "forty-two\n"})

        async def answered() -> bool:
            return "got forty-two" in consoles.text.get(watched, "")

        await eventually(answered, "the watched program read the teacher's input")
        assert not any("got" in consoles.text.get(n, "") for n in names - {watched})

        # Stop all: every program ends, each device reports its exit code.
        code, said = await further_link(teacher_dir, "class", "stop")
        assert code == 0 and f"stop: {CLASS_SIZE} of {CLASS_SIZE} devices" in said, said
        state = await teacher.devices()
        assert all(d["running"] is None and d["exitCode"] is not None for d in state.values())
        code, said = await further_link(teacher_dir, "class", "status")
        assert code == 0 and said.count("online") == CLASS_SIZE, said

        # Lock: a learner's running program stops; their next start is refused with
        # the teacher's words, on both APIs; unlock lets them run again.
        device = devices[0].server
        pupil = await learner(http, device)
        await pupil.send("start", {"sourceScript": "import time\nprint('mine')\ntime.sleep(60)"})
        assert (await pupil.receive_type("started"))["type"] == "started"
        await pupil.read_output("mine\n")
        code, said = await further_link(
            teacher_dir, "class", "lock", "--message", "Eyes on the board"
        )
        assert code == 0 and f"lock: {CLASS_SIZE} of {CLASS_SIZE} devices" in said, said
        stopped = await pupil.receive_type("stopped")
        assert stopped["data"]["exitCode"] != 0
        await pupil.send("start", {"sourceScript": "print('sneaky')"})
        refused = await pupil.receive()
        assert refused == {"type": "error", "data": {"message": "Eyes on the board"}}
        v5 = V5Client(await http.ws_connect(run_url(device)))
        await v5.send("start", "p1", {"runner": "python3", "code": "print('sneaky')"})
        refusal = await v5.expect("p1", "error")
        assert refusal["data"]["message"] == "Eyes on the board"
        async with http.get(
            device.base_url + "/teacher/lock", headers={"Authorization": f"Bearer {device.token}"}
        ) as response:
            assert (await response.json())["message"] == "Eyes on the board"
        assert all(d["locked"] for d in (await teacher.devices()).values())

        code, said = await further_link(teacher_dir, "class", "unlock")
        assert code == 0 and f"unlock: {CLASS_SIZE} of {CLASS_SIZE} devices" in said, said
        result = await pupil.run({"sourceScript": "print('my turn')"})
        assert result.stdout == "my turn\n" and result.exit_code == 0
        await pupil.ws.close()
        await v5.ws.close()

        # A device that dies is shown offline; started again, it is back by itself.
        gone = devices[11]
        assert gone.server.process is not None
        gone.server.process.kill()
        await gone.server.process.wait()

        async def offline() -> bool:
            return (await teacher.devices())[gone.name]["online"] is False

        await eventually(offline, "the killed device shown offline")
        others = await teacher.devices()
        assert sum(1 for d in others.values() if d["online"]) == CLASS_SIZE - 1
        devices[11] = await start_device(gone.root, gone.name, public_key, advertise=True)
        back = devices[11]

        async def online_again() -> bool:
            d = (await teacher.devices())[gone.name]
            return bool(d["online"]) and d["address"] == f"127.0.0.1:{back.port}"

        await eventually(online_again, "the restarted device back in the grid")
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if teacher is not None:
            await teacher.stop()
        await stop_class(devices)


async def test_teacher_commands_need_the_teachers_signature(
    sandbox: Path, http: aiohttp.ClientSession
) -> None:
    """A learner holding the device token cannot lock, unlock or pair as the teacher;
    a signed command cannot be replayed, nor used on another device."""
    from further_link.fleet.teacherkey import TeacherKey

    teacher_key = TeacherKey.load_or_create(sandbox / "teacher")
    impostor = TeacherKey.load_or_create(sandbox / "impostor")
    prefix = class_prefix()
    devices: list[ClassDevice] = await start_class(sandbox, prefix, 2, teacher_key.public)
    try:
        first, second = (d.server for d in devices)

        async def challenge(server: RunningServer) -> str:
            async with http.get(server.base_url + "/teacher/challenge") as response:
                assert response.status == 200
                return str((await response.json())["challenge"])

        async def post(server: RunningServer, body: object, token: bool = False) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {server.token}"} if token else {}
            async with http.post(
                server.base_url + "/teacher", data=json.dumps(body), headers=headers
            ) as response:
                return response.status, await response.text()

        # The learner's token is no teacher's signature.
        learner_body = {"action": "lock", "params": {}, "key": teacher_key.public}
        learner_body.update({"challenge": await challenge(first), "signature": "AAAA"})
        status, text = await post(first, learner_body, token=True)
        assert status == 403 and "signature" in text
        # A key the device was not told to trust.
        status, text = await post(
            first, impostor.command(await challenge(first), None, "lock", {"message": "x"})
        )
        assert status == 403 and "does not trust" in text
        # The real teacher, once; the same signed body again is refused.
        signed = teacher_key.command(await challenge(first), None, "lock", {"message": "hush"})
        status, text = await post(first, signed)
        assert status == 200 and json.loads(text)["message"] == "hush"
        status, text = await post(first, signed)
        assert status == 403 and "already used" in text
        # A signature made for one device's challenge does not move to another.
        status, text = await post(second, signed)
        assert status == 403 and "not issued by this device" in text
        # Parameters changed after signing are refused.
        tampered = teacher_key.command(await challenge(first), None, "unlock", {})
        tampered["action"] = "pair"
        status, text = await post(first, tampered)
        assert status == 403 and "signature" in text
        # Garbage is a 400, never a 500.
        for body in ([], {"action": "lock"}, {"action": "dance", "params": {}}, "x" * 5000):
            status, _ = await post(first, body)
            assert status in (400, 413), body
        async with http.get(first.base_url + "/teacher/lock") as response:
            assert response.status == 401  # the lock's state is for paired clients
    finally:
        await stop_class(devices)


async def test_devices_finds_nothing_quietly_and_says_why(sandbox: Path) -> None:
    """No device announced under the pattern and no list: a hint, exit 1, within the 2 s."""
    began = time.monotonic()
    code, said = await further_link(
        sandbox / "t", "devices", "--interface", "127.0.0.1", "--match", "nobody-here-*"
    )
    assert code == 1 and "--list FILE" in said, said
    assert time.monotonic() - began < TIMEOUT
