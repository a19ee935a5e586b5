"""The dashboard in a real headless browser (Debian's Chromium, driven by Playwright)
against real `nats-cron serve` processes: the table lists jobs and follows changes made
elsewhere, a job created through the form appears, pause/resume/trigger show in the table,
a bad schedule shows the API's own error next to its field, a change without the token is
refused until it is given, a payload with markup stays text, and a phone can read it.
"""

from __future__ import annotations

import asyncio
import re
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from playwright.async_api import expect

from nats_apscheduler.client import ApiError, CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cluster import FireRecorder, ServeProcess
from tests.helpers.web import browser_page, chromium, repo_root, start_serve, unexpected

TOKEN = "browser-token-4711"
WAIT_MS = 10_000  # Playwright's waits, in milliseconds
# The page's Content-Security-Policy forbids evaluating strings, which Playwright's
# `wait_for_function` does: waits are locator expectations instead.
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module", autouse=True)
def browser_exists() -> None:
    chromium()  # skips off Linux, fails where chromium should be and is not


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path_factory.mktemp("dashboard-js")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def instance(server: EmbeddedNatsServer) -> Iterator[str]:
    """The base URL of a serve with its dashboard (loopback, no token)."""
    proc, port = start_serve("dash-open", server.url)
    yield f"http://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="module")
def token_instance(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, ServeProcess, str]]:
    """A serve with a token, on a NATS server of its own (the NATS API answers from any
    instance on a server): its dashboard's URL, the process, its server's URL."""
    token_server = EmbeddedNatsServer(tmp_path_factory.mktemp("dashboard-token-js")).start()
    proc, port = start_serve("dash-token", token_server.url, NATS_CRON_HTTP_TOKEN=TOKEN)
    yield f"http://127.0.0.1:{port}", proc, token_server.url
    proc.stop()
    token_server.stop()


@pytest.fixture
async def nc(server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(server.url)
    yield client
    await client.close()


@pytest.fixture
def api(nc: Client) -> CronClient:
    return CronClient(nc)


def job(subject: str, **schedule: Any) -> dict[str, Any]:
    return {"target": {"subject": subject}, "schedule": schedule or {"every": "1h"}}


def row(page: Any, subject: str) -> Any:
    return page.locator(f'tr[data-subject="{subject}"]')


async def test_the_table_lists_jobs_and_follows_changes_made_elsewhere(
    instance: str, api: CronClient
) -> None:
    await api.create(job("table.hourly", every="1h"))
    await api.create(job("table.weekday", cron="0 9 * * MON-FRI", timezone="Europe/Berlin"))
    async with browser_page() as (page, problems):
        await page.goto(instance + "/#/?pattern=table.>")
        weekday = row(page, "table.weekday")
        await weekday.wait_for(timeout=WAIT_MS)
        assert await page.locator("tr[data-subject]").count() == 2
        assert await weekday.locator(".c-schedule .words").inner_text() == (
            "at 09:00, on Monday to Friday (Europe/Berlin)"
        )
        assert await weekday.locator(".c-schedule .written").inner_text() == "cron: 0 9 * * MON-FRI"
        assert (await weekday.locator(".c-next").inner_text()).startswith("in ")
        assert await weekday.locator(".c-paused").inner_text() == "no"
        assert await page.locator("#pattern").input_value() == "table.>"
        # Made through the NATS API while the page is open: it appears, live.
        await api.create(job("table.later", cron="@daily"))
        await row(page, "table.later").wait_for(timeout=WAIT_MS)
        await api.delete("table.hourly")
        await row(page, "table.hourly").wait_for(state="detached", timeout=WAIT_MS)
        # The filter is the service's: a bad pattern shows its error.
        await page.fill("#pattern", "table.>.x")
        await expect(page.locator("#err-pattern")).to_contain_text("must be the last")
        await page.fill("#pattern", "table.later")
        await row(page, "table.weekday").wait_for(state="detached", timeout=WAIT_MS)
        assert await page.locator("#who").inner_text() != ""
    assert unexpected(problems) == []


async def test_a_job_created_through_the_form_appears(instance: str, api: CronClient) -> None:
    async with browser_page() as (page, problems):
        await page.goto(instance + "/#/new")
        await page.fill("#f-subject", "form.created")
        await page.select_option("#f-kind", "cron")
        await page.fill("#f-schedule", "15 6 * * *")
        await page.fill("#f-timezone", "Asia/Tokyo")
        await page.select_option("#f-ptype", "json")
        await page.fill("#f-pdata", '{"table": "sessions"}')
        # The live preview: the schedule in words and its next ten times, in its zone too.
        preview = page.locator("#preview")
        await preview.locator("table.times tbody tr").nth(9).wait_for(timeout=WAIT_MS)
        assert await preview.locator(".words").inner_text() == "at 06:15, every day (Asia/Tokyo)"
        local = await preview.locator("table.times tbody tr td:nth-child(3)").all_inner_texts()
        assert len(local) == 10 and all(" 06:15:00" in t for t in local)
        await page.click("#f-submit")
        await page.wait_for_url(re.compile(r"#/job/form\.created$"), timeout=WAIT_MS)
        await page.locator("table.times tbody tr").nth(9).wait_for(timeout=WAIT_MS)
        stored = await api.get("form.created")
        assert stored["schedule"] == {"cron": "15 6 * * *", "timezone": "Asia/Tokyo"}
        assert stored["payload"] == {"type": "json", "data": '{"table": "sessions"}'}
        await page.click("nav a[data-nav=jobs]")
        await row(page, "form.created").wait_for(timeout=WAIT_MS)

        # Editing keeps the fields the form does not know, and sends the revision.
        await page.goto(instance + "/#/edit/form.created")
        await expect(page.locator("#f-schedule")).to_have_value("15 6 * * *")
        await page.fill("#f-schedule", "45 7 * * *")
        await page.click("#f-submit")
        await page.wait_for_url(re.compile(r"#/job/form\.created$"), timeout=WAIT_MS)
        assert (await api.get("form.created"))["schedule"]["cron"] == "45 7 * * *"
    assert unexpected(problems) == []


async def test_pause_resume_and_trigger_show_in_the_table(
    instance: str, api: CronClient, nc: Client
) -> None:
    recorder = FireRecorder()
    await recorder.subscribe(nc, "buttons.one")
    await nc.flush()
    await api.create(job("buttons.one", every="1h"))
    async with browser_page() as (page, problems):
        await page.goto(instance + "/#/?pattern=buttons.>")
        the_row = row(page, "buttons.one")
        await the_row.wait_for(timeout=WAIT_MS)
        assert await the_row.locator(".c-last").inner_text() == "\u2013"

        await the_row.locator("button.trigger").click()
        await recorder.wait(lambda fires: len(fires) == 1, timeout=10)
        await the_row.locator(".c-outcome .badge").wait_for(timeout=WAIT_MS)
        assert await the_row.locator(".c-outcome").inner_text() == "fired"
        assert (await the_row.locator(".c-last").inner_text()).endswith(("ago", "now"))

        await the_row.locator("button.toggle").click()  # Pause
        await expect(the_row.locator(".c-paused")).to_have_text("paused")
        assert (await api.get("buttons.one"))["paused"] is True
        assert await the_row.locator("button.toggle").inner_text() == "Resume"
        assert await page.locator("#notice").inner_text() == "buttons.one: paused"

        # Paused, the trigger button runs it once and it stays paused.
        assert await the_row.locator("button.trigger").inner_text() == "Run once"
        await the_row.locator("button.trigger").click()
        await recorder.wait(lambda fires: len(fires) == 2, timeout=10)
        assert (await api.get("buttons.one"))["paused"] is True

        await the_row.locator("button.toggle").click()  # Resume
        await expect(the_row.locator(".c-paused")).to_have_text("no")
        assert (await api.get("buttons.one"))["paused"] is False

        # The job's page: its history shows both runs, with their outcome.
        await the_row.locator(".c-subject a").click()
        runs = page.locator("table.history tr.run")
        await runs.nth(1).wait_for(timeout=WAIT_MS)
        assert await runs.count() == 2
        assert await runs.first.locator("td[data-label=outcome]").inner_text() == "fired"
        # Delete, after the browser's confirmation.
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.click("button.delete")
        await page.wait_for_url(re.compile(r"#/$"), timeout=WAIT_MS)
        with pytest.raises(ApiError):
            await api.get("buttons.one")
    assert unexpected(problems) == []


async def test_a_bad_schedule_shows_the_apis_error_next_to_its_field(
    instance: str, api: CronClient
) -> None:
    bad = job("form.bad", cron="0 9 * * MONDAY")
    with pytest.raises(ApiError) as caught:
        await api.create(bad)
    expected = caught.value.message
    assert expected.startswith("schedule.cron: ")
    async with browser_page() as (page, problems):
        await page.goto(instance + "/#/new")
        await page.fill("#f-subject", "form.bad")
        await page.fill("#f-schedule", "0 9 * * MONDAY")
        error = page.locator('[data-field="schedule"] .field-error')
        await expect(error).to_have_text(expected)  # beside the expression, from the preview
        assert await page.locator("#f-schedule").get_attribute("aria-invalid") == "true"
        await page.fill("#f-subject", "form.bad2")  # the preview clears nothing it should not
        await page.fill("#f-subject", "form.bad")
        await page.click("#f-submit")  # the service refuses it too
        await expect(error).to_have_text(expected)
        assert "#/new" in page.url
        with pytest.raises(ApiError):
            await api.get("form.bad")
        # An interval in days: its own message, on the same field.
        await page.select_option("#f-kind", "every")
        await page.fill("#f-schedule", "1d")
        await expect(error).to_contain_text('schedule.every: "1d": unknown unit "d"')
        # A subject that is not a concrete subject: on the subject field.
        await page.fill("#f-schedule", "1h")
        await page.fill("#f-subject", "form.*")
        await expect(page.locator("#err-subject")).to_contain_text("target.subject: ")
        await expect(error).to_have_text("")
    assert unexpected(problems) == []


async def test_a_change_without_the_token_is_refused(
    token_instance: tuple[str, ServeProcess, str],
) -> None:
    base, proc, url = token_instance
    nc = await nats.connect(url)
    try:
        await refused_until_the_token_is_given(base, proc, CronClient(nc))
    finally:
        await nc.close()


async def refused_until_the_token_is_given(base: str, proc: ServeProcess, api: CronClient) -> None:
    await api.create(job("token.one", every="1h"))
    async with browser_page() as (page, problems):
        await page.goto(base + "/#/?pattern=token.>")
        the_row = row(page, "token.one")
        await the_row.wait_for(timeout=WAIT_MS)  # reading needs no token
        dialog = page.locator("#token-dialog")

        await the_row.locator("button.toggle").click()
        await dialog.wait_for(state="visible", timeout=WAIT_MS)
        await page.click("#token-cancel")
        await expect(page.locator("#notice")).to_contain_text("needs the dashboard's token")
        assert "bad" in (await page.locator("#notice").get_attribute("class") or "")
        assert (await api.get("token.one"))["paused"] is False

        # A wrong token is refused, and asked for again.
        await the_row.locator("button.toggle").click()
        await dialog.wait_for(state="visible", timeout=WAIT_MS)
        await page.fill("#token-input", "not-the-token")
        await page.click("#token-ok")
        await page.locator("#token-dialog .why").wait_for(timeout=WAIT_MS)
        assert await page.locator("#token-dialog .why").inner_text() == "That token was refused."
        await page.fill("#token-input", TOKEN)
        await page.click("#token-ok")
        await expect(the_row.locator(".c-paused")).to_have_text("paused")
        assert (await api.get("token.one"))["paused"] is True
        # Asked once: the next change goes through without asking.
        assert await page.evaluate("sessionStorage.getItem('nats-cron-token')") == TOKEN
        await the_row.locator("button.toggle").click()
        await expect(the_row.locator(".c-paused")).to_have_text("no")
        assert not await dialog.is_visible()
    assert not any(TOKEN in line for line in proc.raw)
    assert unexpected(problems) == []


async def test_markup_in_a_job_stays_text(instance: str, api: CronClient) -> None:
    payload = (
        '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2"><b>bold</b>'
    )
    await api.create({**job("markup.one"), "payload": {"type": "text", "data": payload}})
    async with browser_page() as (page, problems):
        await page.goto(instance + "/#/job/markup.one")
        document = page.locator("pre.document")
        await expect(document).to_contain_text("__pwned")
        assert payload.replace('"', '\\"') in await document.inner_text()
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator("main img, main b, main script").count() == 0
        await page.goto(instance + "/#/edit/markup.one")
        await expect(page.locator("#f-pdata")).to_have_value(payload)
        assert await page.evaluate("window.__pwned") is None
    assert unexpected(problems) == []


async def test_a_phone_can_read_it(instance: str, api: CronClient) -> None:
    await api.create(job("phone.reports.daily.with.a.long.subject", cron="0 9 * * MON-FRI"))
    async with browser_page(width=390, height=844) as (page, problems):
        for path in (
            "/#/?pattern=phone.>",
            "/#/job/phone.reports.daily.with.a.long.subject",
            "/#/new",
            "/#/cluster",
        ):
            await page.goto(instance + path)
            await page.wait_for_selector("main section", timeout=WAIT_MS)
            await page.wait_for_load_state("networkidle")
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{path}: {width}px wide on a 390px screen"
        await page.goto(instance + "/#/?pattern=phone.>")
        cell = row(page, "phone.reports.daily.with.a.long.subject").locator(".c-next")
        await cell.wait_for(timeout=WAIT_MS)
        # Cards: each value is labelled (the header row is hidden).
        assert await page.locator("table.jobs thead").is_hidden()
        label = await cell.evaluate("td => getComputedStyle(td, '::before').content")
        assert label == '"Next run"'
    assert unexpected(problems) == []


async def test_the_cluster_page(instance: str) -> None:
    async with browser_page() as (page, problems):
        await page.goto(instance + "/#/cluster")
        await page.locator("table.instances tr[data-instance=dash-open]").wait_for(timeout=WAIT_MS)
        text = await page.locator("main").inner_text()
        assert "nats_cron_is_leader" in text and "leader" in text
        assert "changes_subject" in text  # every key of the status, shown
    assert unexpected(problems) == []


async def test_the_screenshot_script_makes_every_picture(tmp_path: Path) -> None:
    """docs/screenshots.py (which makes the README's pictures) runs: its own server, two
    instances, a browser, six PNGs of the right size."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(repo_root() / "docs" / "screenshots.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, width in (("dashboard-jobs.png", 1280), ("dashboard-phone.png", 390)):
        head = (tmp_path / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">I", head[16:20])[0] == width
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        p.name for p in (repo_root() / "docs").glob("dashboard-*.png")
    )
