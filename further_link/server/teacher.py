"""The teacher's routes: a challenge, then signed ``pair``, ``lock`` and ``unlock``.

``GET /teacher/challenge`` (open, like /pair) -> ``{"challenge": str,
"fingerprint": str | null, "seconds": float}``.

``POST /teacher`` with ``{"action": "pair" | "lock" | "unlock", "params":
{...}, "key": base64, "challenge": str, "signature": base64}`` (trust/teachers.py
says what is signed) -> ``pair``: ``{"token": device token}``; ``lock``
(params ``{"message": str}``): every program is stopped and no start is
accepted until ``unlock``; both answer the lock's state ``{"locked": bool,
"message": str, "since": float | null}``. Refusals: 400 (malformed), 403
(untrusted key, bad signature, stale challenge) with ``{"error": str}``.

``GET /teacher/lock`` (device token, as /device) -> the lock's state, so a
learner's page can say why nothing starts.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

from aiohttp import web

from further_link.compat import app_key
from further_link.config import Config
from further_link.errors import BodyError, TeacherError
from further_link.runs.classlock import ClassLock
from further_link.server.access import TOKENS, check_origin, check_paired
from further_link.server.bodies import read_json_object
from further_link.trust.teachers import (
    ACTIONS,
    CHALLENGE_SECONDS,
    ChallengeBook,
    TrustedTeachers,
    certificate_sha256,
    signed_message,
)

log = logging.getLogger(__name__)

MAX_TEACHER_BODY = 4096


class Teaching:
    """What the teacher's routes share: trusted keys, challenges, the lock, this device's pin."""

    def __init__(self, config: Config, fingerprint: str | None) -> None:
        self.teachers = TrustedTeachers(config.teacher_keys)
        self.challenges = ChallengeBook()
        self.lock = ClassLock()
        # SHA-256 of the certificate this server presents (None over plain HTTP);
        # read before the server drops root (cli.serve), as the key file is root's.
        self.fingerprint = fingerprint


TEACHING = app_key("teaching", Teaching)


async def challenge(request: web.Request) -> web.Response:
    check_origin(request)
    teaching = request.app[TEACHING]
    body = {
        "challenge": teaching.challenges.issue(),
        "fingerprint": teaching.fingerprint,
        "seconds": CHALLENGE_SECONDS,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def command(request: web.Request) -> web.Response:
    check_origin(request)
    teaching = request.app[TEACHING]
    timeout = request.app[TEACHING_CONFIG].header_timeout
    try:
        body = await read_json_object(request, MAX_TEACHER_BODY, timeout, "send a JSON object")
    except BodyError as refused:
        raise _refusal(refused.status, refused.message) from None
    action, params = body.get("action"), body.get("params", {})
    key, challenge_text, signature = body.get("key"), body.get("challenge"), body.get("signature")
    if action not in ACTIONS or not isinstance(params, dict):
        raise _refusal(400, f"action must be one of {', '.join(ACTIONS)}, params an object")
    if not all(isinstance(v, str) for v in (key, challenge_text, signature)):
        raise _refusal(400, "key, challenge and signature must be strings")
    assert isinstance(key, str) and isinstance(challenge_text, str) and isinstance(signature, str)
    if not teaching.teachers:
        raise _refusal(
            403,
            "this device trusts no teacher yet; on the device run `further-link trust-teacher KEY`",
        )
    try:
        teaching.challenges.check(challenge_text)
        message = signed_message(challenge_text, teaching.fingerprint, action, params)
        teaching.teachers.verify(key, message, signature)
    except TeacherError as exc:
        log.info("refused a teacher's %s from %s: %s", action, request.remote, exc.message)
        raise _refusal(403, exc.message) from None
    teaching.challenges.spend(challenge_text)
    log.info("teacher's %s from %s", action, request.remote)
    if action == "pair":
        return web.json_response({"token": request.app[TOKENS].current()})
    if action == "lock":
        text = params.get("message", "")
        teaching.lock.lock(text if isinstance(text, str) else "")
    else:
        teaching.lock.unlock()
    return web.json_response(teaching.lock.state())


async def lock_state(request: web.Request) -> web.Response:
    headers = check_paired(request)
    state = request.app[TEACHING].lock.state()
    return web.json_response(state, headers={**headers, "Cache-Control": "no-store"})


def _refusal(status: int, message: str) -> web.HTTPException:
    kinds: dict[int, type[web.HTTPException]] = {
        400: web.HTTPBadRequest,
        403: web.HTTPForbidden,
        408: web.HTTPRequestTimeout,
        413: web.HTTPRequestEntityTooLarge,
    }
    body = json.dumps({"error": message})
    if status == 413:
        return web.HTTPRequestEntityTooLarge(
            MAX_TEACHER_BODY, 0, text=body, content_type="application/json"
        )
    return kinds[status](text=body, content_type="application/json")


TEACHING_CONFIG = app_key("teaching_config", Config)


def served_certificate_fingerprint(config: Config) -> str | None:
    """SHA-256 of the certificate the server presents; None without TLS or when unreadable.

    A server started as root calls this before it drops (the config dir is root's).
    """
    if not config.ssl:
        return None
    path = config.cert_file or config.config_dir / "cert.pem"
    try:
        pem = Path(path).read_bytes()
    except OSError:
        return None
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii", "replace"))
    return certificate_sha256(der)


def setup_teacher(app: web.Application, config: Config, fingerprint: str | None = None) -> None:
    """Serve the teacher's routes. ``fingerprint``: the served certificate's, as read
    before a privilege drop; when None it is read now (None again without TLS)."""
    if fingerprint is None:
        fingerprint = served_certificate_fingerprint(config)
    app[TEACHING] = Teaching(config, fingerprint)
    app[TEACHING_CONFIG] = config
    app.router.add_get("/teacher/challenge", challenge)
    app.router.add_post("/teacher", command)
    app.router.add_get("/teacher/lock", lock_state)
