"""The dashboard in tests: a `nats-cron serve` with its HTTP listener, plain HTTP calls, and
Debian's Chromium driven by Playwright (never `playwright install`: no browser download)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.helpers.cli_run import service_env
from tests.helpers.cluster import ServeProcess

LISTENING = "metrics and health on"
# Chromium on a closed network: without the background-networking flags it keeps trying
# to reach Google's services and its connections are refused.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium() -> str:
    """Debian's chromium; a test skips only where it cannot exist (not Linux), and fails
    where it should (CI's `.ci/run` installs it)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the browser tests drive Debian's chromium: Linux only")
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")


def start_serve(
    name: str, url: str, *, args: list[str] | None = None, **env: str
) -> tuple[ServeProcess, int]:
    """A `serve` on its own buckets with `--http-port 0`; returns it and its HTTP port once
    it leads and listens."""
    proc = ServeProcess(
        name,
        service_env(
            url,
            name,
            **{"NATS_CRON_HTTP_PORT": "0", "NATS_CRON_HTTP_HOST": "", "NATS_CRON_HTTP_TOKEN": ""}
            | env,
        ),
        args=args,
    )
    try:
        line = proc.wait_for(LISTENING, timeout=20)
        proc.wait_for("nats-cron instance started", timeout=20)
    except BaseException:
        proc.stop()
        raise
    return proc, int(line["port"])


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Http:
    """Requests to one listener (`aiohttp`'s client)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.base = f"http://{host}:{port}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Http:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        assert self._session is not None
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self._session.request(method, self.base + path, data=data, headers=sent) as resp:
            return Reply(resp.status, CIMultiDict(resp.headers), await resp.text())

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)


@asynccontextmanager
async def browser_page(
    width: int = 1280, height: int = 860
) -> AsyncIterator[tuple[Any, list[str]]]:
    """A fresh headless Chromium page (its own profile) and the list its console errors,
    page errors and Content-Security-Policy violations go to."""
    from playwright.async_api import async_playwright

    executable = chromium()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nats-cron-chromium-") as profile:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height},
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                await page.add_init_script(
                    "document.addEventListener('securitypolicyviolation', e => "
                    "console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))"
                )
                page.on(
                    "console",
                    lambda m: problems.append(m.text) if m.type == "error" else None,
                )
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                yield page, problems
            finally:
                await context.close()


def unexpected(problems: list[str]) -> list[str]:
    """Console errors other than the browser's note on an answer the test asked for (a
    4xx the page shows)."""
    return [p for p in problems if not p.startswith("Failed to load resource")]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
