"""The committed page (further_link/web/) is exactly what its sources build.

A fresh copy of web/'s sources, its npm packages installed from
package-lock.json (`npm ci`, from the npm registry), bundled by build.mjs
into a temporary folder: every file must equal the committed one, byte for
byte, and nothing may be missing or extra. Needs node and npm (`make
system-deps` installs Debian's when there are none).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "web"
BUILT = ROOT / "further_link" / "web"
# npm ci downloads a few MB on a cold cache; a busy machine may be slow.
TIMEOUT_SECONDS = 600


async def run(*command: str, cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{text[-3000:]}"
    return text


async def test_the_committed_page_equals_a_fresh_build_from_the_lock_file(
    tmp_path: Path,
) -> None:
    assert shutil.which("node") and shutil.which("npm"), "needs node and npm: make system-deps"
    source = tmp_path / "web"
    source.mkdir()
    for name in ("package.json", "package-lock.json", "build.mjs"):
        shutil.copy2(SOURCES / name, source / name)
    shutil.copytree(SOURCES / "src", source / "src")
    await run("npm", "ci", "--no-audit", "--no-fund", cwd=source)
    out = tmp_path / "out"
    await run("node", "build.mjs", str(out), cwd=source)

    built = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
    committed = {
        path.name: path.read_bytes()
        for path in sorted(BUILT.iterdir())
        if path.is_file() and path.name != "__init__.py"
    }
    assert sorted(built) == sorted(committed), "run `make web` and commit further_link/web/"
    stale = [name for name in built if built[name] != committed[name]]
    assert stale == [], f"{stale} differ from a fresh build: run `make web` and commit them"
    assert {"index.html", "app.js", "app.css", "LICENSES.txt", "favicon.svg"} <= set(built)
