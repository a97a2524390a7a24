"""The technologist console in a real headless Chromium (Debian's chromium, driven by Playwright with
the system executable) while the virtual scanner streams an exam with injected faults: the checklist
fills in live, the protocol deviation and the quarantined file show as alerts with their action,
acknowledging one works end to end (an AlertAcknowledged event in the store), and a screenshot is
kept in tests/artifacts/console.png."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.agent import _live

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SCANSIDE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium executable (/usr/bin/chromium): `make setup` installs Debian's chromium as root")
    from playwright import sync_api  # the test extra installs it: a missing package is a failure, not a skip

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=exe, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def test_console_live_checklist_alerts_and_ack(browser, tmp_path_factory):
    src, truth = _live.exam(tmp_path_factory, seed=8, faults=("b1000_high", "truncated_file"))
    agent = _live.start(tmp_path_factory.mktemp("console-agent"))
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # the console runs under its Content-Security-Policy (scanside.agent.service.apiguard): a violation is a console error
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        page.goto(f"{agent.api_url}/console")
        page.wait_for_selector("#conn.conn-on", timeout=15_000)  # the EventSource is connected
        assert page.locator("#checklist li").count() == 0

        # the scanner streams the exam; watch the page fill in without a reload
        streamer = _live.stream_in_background(src, agent, truth, rate=120, series_pause_s=0.4)
        done_counts = []
        end = time.monotonic() + 120
        while time.monotonic() < end:
            done_counts.append(page.locator("#checklist li.done").count())
            if not streamer.is_alive() and _live.completed_parts(agent) >= _live.expected_parts(truth):
                break
            time.sleep(0.25)
        streamer.join(timeout=5)
        assert len({c for c in done_counts if c > 0}) >= 2, f"checklist did not fill in live: {done_counts[-20:]}"

        # the protocol deviation (b1000 instead of >= 1400) and the quarantined file both show
        deviation = page.locator("#alerts li.alert[data-code='DWI_HIGH_B_TOO_LOW']")
        deviation.wait_for(timeout=30_000)
        quarantine = page.locator("#alerts li.alert[data-code='FILE_QUARANTINED']")
        quarantine.wait_for(timeout=30_000)
        assert "1400" in deviation.locator(".msg").inner_text()
        assert deviation.locator(".sev").inner_text().strip().lower() in ("critical", "warning")
        assert deviation.locator(".action").inner_text().startswith("→")
        assert page.locator("#checklist li[data-key='dwi_high']").get_attribute("data-status") == "deviating" \
            or page.locator("#checklist li.deviating").count() >= 1
        assert page.locator("#checklist li.done").count() >= 4
        # state is never shown by colour alone: each line carries a word
        for text in page.locator("#checklist li .status").all_inner_texts():
            assert text in ("DONE", "PENDING", "CHECK")

        # acknowledge the deviation from the page
        alert_id = deviation.get_attribute("data-alert-id")
        deviation.locator("button.btn-ack").click()
        acked = page.locator(f"#alerts li.alert[data-alert-id='{alert_id}'] .acked")
        acked.wait_for(timeout=15_000)
        assert "Acknowledged" in acked.inner_text()
        assert page.locator(f"#alerts li.alert[data-alert-id='{alert_id}'] button.btn-ack").count() == 0
        acks = [e for e in agent.store.events_after(0, limit=100_000) if e.type == "alert_acknowledged"]
        assert [a.alert_id for a in acks] == [alert_id]
        assert acks[0].study_uid == truth.study_uid

        # nothing identifying on the page
        body = page.locator("body").inner_text()
        for ident in (truth.patient_name, truth.patient_id, truth.accession_number, truth.study_uid):
            assert ident not in body

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
        assert (ARTIFACTS / "console.png").stat().st_size > 10_000

        # the technologist ends the exam from the page
        page.locator("#done").click()
        # a locator, not wait_for_function: that evaluates a string, which the console's CSP (no eval) refuses
        page.locator("#exam", has_text="ENDED").wait_for(timeout=15_000)
        ends = [e for e in agent.store.events_after(0, limit=100_000) if e.type == "exam_completed"]
        assert [(e.reason, e.study_uid) for e in ends] == [("operator", truth.study_uid)]
        assert page.locator("#done").is_hidden()
        assert not errors, errors
    finally:
        page.close()
        agent.stop()
