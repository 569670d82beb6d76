"""The teacher's commands: ``devices``, ``teacher-key``, ``teach``, ``class ...``;
and the device's ``trust-teacher``.

``teach`` keeps the class (fleet/classroom.py) and serves the page
(fleet/teachweb.py) until Ctrl-C; the ``class`` commands ask that running
page's API, so the page and the terminal always drive the same class.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from further_link.client.commands import read_project
from further_link.client.hosts import HostStore
from further_link.config import TEACHERS_FILE, resolve_config_dir, teacher_keys_in
from further_link.errors import ClientError, ConfigError
from further_link.fleet.classroom import Classroom
from further_link.fleet.discovery import (
    BROWSE_SECONDS,
    Browser,
    FoundDevice,
    browse,
    matches,
    read_device_list,
)
from further_link.fleet.teacherkey import TeacherKey
from further_link.fleet.teachweb import (
    KEY_HEADER,
    TEACH_FILE,
    create_teach_app,
    new_session_key,
    read_teach_file,
    write_teach_file,
)
from further_link.trust.secretfile import write_secret
from further_link.trust.teachers import parse_public_key

DEVICE_LIST = "devices.txt"
TEACH_PORT = 8029
CLASS_TIMEOUT = 120.0


def add_fleet_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the teacher's commands and the device's ``trust-teacher``."""
    devices = commands.add_parser(
        "devices",
        help="list the further-link devices on this network",
        description="Lists devices announced on the local network (mDNS) and those in "
        "the device list file, with their address, version and whether they are paired.",
    )
    _add_class_flags(devices)
    devices.add_argument(
        "--seconds", type=float, default=BROWSE_SECONDS, help="how long to listen (default 1.5)"
    )
    devices.set_defaults(handler=_devices_command)

    key = commands.add_parser(
        "teacher-key",
        help="print this teacher's public key (made the first time)",
        description="Prints the public key devices are told to trust with "
        "`further-link trust-teacher KEY`; the private key stays in the config dir.",
    )
    key.add_argument("--config-dir", help="where the key is kept (default ~/.config/further-link)")
    key.set_defaults(handler=_teacher_key_command)

    trust = commands.add_parser(
        "trust-teacher",
        help="on a device: obey the teacher with this public key",
        description="Adds KEY to the device's teachers file; the teacher's tool can then "
        "pair, lock and unlock this device. Restart the server to apply.",
    )
    trust.add_argument("key", metavar="KEY", help="the key `further-link teacher-key` printed")
    trust.add_argument("name", nargs="?", default="", help="a note: whose key it is")
    trust.add_argument("--config-dir", help="the server's config dir")
    trust.set_defaults(handler=_trust_teacher_command)

    teach = commands.add_parser(
        "teach",
        help="the teacher's page: the whole class in one browser tab",
        description="Finds the class's devices, pairs them with the teacher key, and "
        "serves the teacher's page on http://127.0.0.1:PORT (this machine only).",
    )
    _add_class_flags(teach)
    teach.add_argument("--port", type=int, default=TEACH_PORT, help="default 8029 (0: any)")
    teach.add_argument(
        "--no-browse", action="store_true", help="use only the device list, not mDNS"
    )
    teach.set_defaults(handler=_teach_command)

    lesson = commands.add_parser(
        "class",
        help="drive the class of the running `further-link teach`",
        description="Commands for every device of the class (or --devices NAME,...).",
    )
    lesson.add_argument("--config-dir", help="the teacher's config dir")
    actions = lesson.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="push and run FILE or DIR everywhere")
    run.add_argument("path", metavar="FILE|DIR")
    run.add_argument("--main", help="the file of DIR to run (default main.py, or its only .py)")
    push = actions.add_parser("push", help="upload DIR to every device")
    push.add_argument("path", metavar="DIR")
    lock = actions.add_parser("lock", help="stop every program and refuse new ones")
    lock.add_argument("--message", default="", help='what learners see, e.g. "Eyes on the board"')
    for name, text in (
        ("stop", "stop every program"),
        ("unlock", "let learners run programs again"),
        ("status", "show the class"),
        ("pair", "pair every device with the teacher key"),
    ):
        actions.add_parser(name, help=text)
    for parser in actions.choices.values():
        parser.add_argument("--devices", help="NAME,NAME,... (default: the whole class)")
        parser.add_argument("--config-dir", help=argparse.SUPPRESS)
    lesson.set_defaults(handler=_class_command)


def _add_class_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--list",
        metavar="FILE",
        help="device list: HOST[:PORT] or http://HOST:PORT per line "
        "(default: devices.txt in the config dir, when there)",
    )
    parser.add_argument(
        "--interface",
        action="append",
        metavar="ADDRESS",
        help="look for devices on this address's interface only (repeatable; default: all)",
    )
    parser.add_argument("--match", metavar="PATTERN", help="only devices named so, e.g. '7b-*'")
    parser.add_argument("--config-dir", help="where tokens and keys are kept")


def _config_dir(args: argparse.Namespace) -> Path:
    return resolve_config_dir(os.environ, args.config_dir)


def _listed(args: argparse.Namespace, config_dir: Path) -> list[FoundDevice]:
    path = Path(args.list) if args.list else config_dir / DEVICE_LIST
    if not args.list and not path.exists():
        return []
    return [d for d in read_device_list(path) if matches(d, args.match)]


# ----------------------------------------------------------------- devices


def _devices_command(args: argparse.Namespace) -> int:
    config_dir = _config_dir(args)
    store = HostStore(config_dir)
    try:
        found = {d.name: d for d in _listed(args, config_dir)}
        announced = asyncio.run(browse(args.seconds, args.interface))
    except ClientError as exc:
        print(f"further-link: {exc.message}")
        return 1
    found.update({d.name: d for d in announced if matches(d, args.match)})
    if not found:
        print("no devices found (is multicast blocked here? list them in a file: --list FILE)")
        return 1
    print(f"{'NAME':<20} {'ADDRESS':<24} {'VERSION':<12} {'TLS':<4} PAIRED  FROM")
    for device in sorted(found.values(), key=lambda d: d.name):
        key = f"{device.host}:{device.port}"
        paired = "yes" if store.get(key).token else "no"
        print(
            f"{device.name:<20} {key:<24} {device.version or '?':<12} "
            f"{'on' if device.tls else 'off':<4} {paired:<7} {device.source}"
        )
    return 0


# ------------------------------------------------------------- keys, trust


def _teacher_key_command(args: argparse.Namespace) -> int:
    key = TeacherKey.load_or_create(_config_dir(args))
    print(key.public)
    print(f"on each device (or in its teachers file): further-link trust-teacher {key.public}")
    return 0


def _trust_teacher_command(args: argparse.Namespace) -> int:
    try:
        parse_public_key(args.key)
    except ConfigError as exc:
        print(f"further-link: {exc.message}")
        return 1
    config_dir = resolve_config_dir(os.environ, args.config_dir, server=True)
    path = config_dir / TEACHERS_FILE
    try:
        existing = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = ""
    if args.key in teacher_keys_in(existing):
        print(f"{path} already trusts this teacher")
        return 0
    note = " ".join(args.name.split())
    line = f"{args.key} {note}".rstrip() + "\n"
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    separator = "" if not existing or existing.endswith("\n") else "\n"
    write_secret(path, (existing + separator + line).encode("utf-8"))
    print(f"{path} now trusts this teacher; restart further-link to apply")
    return 0


# -------------------------------------------------------------------- teach


async def teach(args: argparse.Namespace, ready: asyncio.Event | None = None) -> None:
    """Serve the teacher's page until SIGINT or SIGTERM (or the task is cancelled)."""
    config_dir = _config_dir(args)
    store = HostStore(config_dir)
    key = TeacherKey.load_or_create(config_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(RuntimeError):  # not the main thread (tests)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    async with Classroom(store, key) as classroom:
        pairing: set[asyncio.Task[None]] = set()

        def found(device: FoundDevice) -> None:
            if not matches(device, args.match):
                return
            link = classroom.add(device)
            if not link.paired:
                # Pairing with the teacher key: no code to type at any device.
                task = asyncio.ensure_future(_pair_quietly(classroom, link.name))
                pairing.add(task)
                task.add_done_callback(pairing.discard)

        for device in _listed(args, config_dir):
            found(device)
        browser = None if args.no_browse else Browser(found, classroom.gone, args.interface)
        if browser is not None:
            await browser.start()
        classroom.start_polling()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        port = sock.getsockname()[1]
        session_key = new_session_key()
        runner = web.AppRunner(create_teach_app(classroom, session_key, port), access_log=None)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            path = write_teach_file(config_dir, port, session_key)
            print(f"the teacher's page: http://127.0.0.1:{port}/#key={session_key}", flush=True)
            print(f"(`further-link class ...` finds it through {path})", flush=True)
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            with contextlib.suppress(OSError):
                (config_dir / TEACH_FILE).unlink()
            for task in list(pairing):
                task.cancel()
            await asyncio.gather(*pairing, return_exceptions=True)
            if browser is not None:
                await browser.close()
            await runner.cleanup()


async def _pair_quietly(classroom: Classroom, name: str) -> None:
    """Pair one device, then show its state at once; a refusal is shown in its tile."""
    outcomes = await classroom.each([name], lambda link: link.pair())
    if outcomes[0].ok:
        await classroom.each([name], lambda link: link.poll())


def _teach_command(args: argparse.Namespace) -> int:
    try:
        asyncio.run(teach(args))
    except ClientError as exc:
        print(f"further-link: {exc.message}")
        return 1
    except KeyboardInterrupt:
        pass
    return 0


# -------------------------------------------------------------------- class


def class_request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(HTTP method, API path, JSON body) for a ``class`` command."""
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    body: dict[str, Any] = {"devices": devices}
    if args.action == "status":
        return "GET", "/api/state", {}
    if args.action in ("run", "push"):
        path = Path(args.path)
        if path.is_dir():
            project = read_project(path)
            body["project"] = {"name": project.name, "files": project.files}
            if args.action == "run" and args.main:
                body["main"] = args.main
        elif args.action == "push":
            raise ClientError(f"{path} is not a directory")
        else:
            try:
                body["script"] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ClientError(f"cannot read {path}: {exc}") from None
            body["name"] = path.name
    if args.action == "lock":
        body["message"] = args.message
    return "POST", f"/api/{args.action}", body


async def ask_teach(config_dir: Path, method: str, path: str, body: dict[str, Any]) -> Any:
    port, key = read_teach_file(config_dir)
    timeout = aiohttp.ClientTimeout(total=CLASS_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.request(
                method,
                f"http://127.0.0.1:{port}{path}",
                headers={KEY_HEADER: key},
                json=body if method == "POST" else None,
            ) as response:
                text = await response.text()
                if response.status != 200:
                    raise ClientError(f"the teacher's page refused: {text.strip()}")
                return json.loads(text)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ClientError(f"cannot reach `further-link teach` on port {port}: {exc}") from None


def _class_command(args: argparse.Namespace) -> int:
    try:
        method, path, body = class_request(args)
        answer = asyncio.run(ask_teach(_config_dir(args), method, path, body))
    except ClientError as exc:
        print(f"further-link: {exc.message}")
        return 1
    if args.action == "status":
        print(f"{'NAME':<20} {'STATE':<8} {'RUNNING':<24} {'EXIT':<5} {'BATT':<5} {'TEMP':<6} LOCK")
        for d in answer["devices"]:
            state = "online" if d["online"] else "offline" if d["online"] is False else "?"
            battery = f"{d['battery']:.0f}%" if d.get("battery") is not None else "-"
            temp = f"{d['temperature']:.0f}C" if d.get("temperature") is not None else "-"
            code = "-" if d["exitCode"] is None else str(d["exitCode"])
            print(
                f"{d['name']:<20} {state:<8} {d['running'] or '-':<24} {code:<5} {battery:<5} "
                f"{temp:<6} {'locked' if d['locked'] else ''}"
            )
            if d.get("error"):
                print(f"  {d['error']}")
        return 0
    failed = [r for r in answer["results"] if not r["ok"]]
    done = len(answer["results"]) - len(failed)
    print(f"{args.action}: {done} of {len(answer['results'])} devices in {answer['seconds']:.2f} s")
    for result in failed:
        print(f"  {result['name']}: {result['error']}")
    return 1 if failed else 0
