"""The dashboard in a real headless Chromium (Debian's, driven by playwright)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from conftest import DATA, ROOT, run_server

ARTIFACTS = ROOT / "tests" / "artifacts"
LOADED = "images => images.filter(i => i.complete && i.naturalWidth > 0).length"
# Without the networking flags Chromium keeps trying to reach Google's hosts from here.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed; `make test` installs it with apt-get")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Chromium logs every 4xx as a console error; the refusal test makes one on purpose.
    page.on("console", lambda message: message.type == "error" and not message.text.startswith(
        "Failed to load resource") and errors.append(message.text))
    page.goto(f"{server.url}/dashboard")
    page.wait_for_selector("#connection[data-state=live]")
    yield page
    page.close()
    assert errors == [], "the page reported errors"


def eventually(condition, seconds: float = 15) -> None:
    """Poll from Python: the page's CSP forbids the eval that page.wait_for_function uses."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the page never got there"
        time.sleep(0.05)


def submit_form(page: Page, kind: str, file: str | None = None, **options: str) -> str:
    """Fill in and send the dashboard's form; the new job's id."""
    page.select_option("#job-type", kind)
    fieldset = f"fieldset[data-kind={kind}]"
    if file:
        page.set_input_files(f"{fieldset} input[type=file]", file)
    for name, value in options.items():
        page.fill(f"{fieldset} input[name={name}]", value)
    with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST"
                              ) as answer:
        page.click("#submit-form button[type=submit]")
    assert answer.value.status == 202, answer.value.text()
    return answer.value.json()["id"]


def test_queues_show_the_servers_workers(page):
    row = "#queues tr[data-kind=message]"
    eventually(lambda: page.inner_text(f"{row} .workers") == "4")
    assert page.inner_text(f"{row} .capacity") == "64"


def test_pdf_through_the_form_shows_progress_and_thumbnails(page):
    job_id = submit_form(page, "pdf2image", str(DATA / "sample.pdf"), dpi="100")
    card = f".job[data-id='{job_id}']"
    page.wait_for_selector(card)  # it appears at once, from the event stream
    page.wait_for_selector(f"{card}[data-status=succeeded]", timeout=30_000)
    eventually(lambda: page.locator(f"{card} .fill").evaluate("e => e.style.width") == "100%")
    assert page.inner_text(f"{card} .progress-text") == "4 of 4 pages"
    thumbnails = page.locator(f"{card} img.thumbnail")
    eventually(lambda: thumbnails.evaluate_all(LOADED) == 4)
    assert thumbnails.evaluate_all("images => images.map(i => i.naturalWidth)") == [128] * 4
    first = thumbnails.first.evaluate("i => i.src")
    assert first.endswith("/files/page-001.png?w=128")
    result = page.locator(f"{card} a.result")
    assert result.get_attribute("href") == f"/jobs/{job_id}/result"


def test_video_through_the_form_plays_its_preview(page):
    job_id = submit_form(page, "video", str(DATA / "sample.mp4"), width="320")
    card = f".job[data-id='{job_id}']"
    page.wait_for_selector(f"{card}[data-status=succeeded]", timeout=60_000)
    preview = page.locator(f"{card} img.preview")
    preview.wait_for()
    eventually(lambda: preview.evaluate("i => i.naturalWidth") > 0)
    first = preview.screenshot()
    time.sleep(0.6)
    assert preview.screenshot() != first, "the preview should move"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)


def test_refusal_is_shown_and_a_running_job_can_be_cancelled(page):
    page.select_option("#job-type", "video")
    page.fill("fieldset[data-kind=video] input[name=width]", "641")
    page.click("#submit-form button[type=submit]")
    message = page.locator("#submit-message.failed")
    message.wait_for()
    assert "422" in message.inner_text() and "even number" in message.inner_text()

    job_id = submit_form(page, "message", data="cancel me", seconds="30")
    card = f".job[data-id='{job_id}']"
    page.wait_for_selector(f"{card}[data-status=running]")
    page.click(f"{card} button.cancel")
    page.wait_for_selector(f"{card}[data-status=cancelled]")
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete this job and its files?"
    page.click(f"{card} button.delete")  # a finished job is deleted, and leaves the page
    page.wait_for_selector(card, state="detached")


def test_dashboard_with_api_keys(browser, tmp_path):
    with run_server(tmp_path, api_keys="dash-key,other-key") as keyed:
        with keyed.client(headers={"X-API-Key": "other-key"}) as other:
            assert other.post("/put", json={"seconds": 0}).status_code == 200
        page = browser.new_page()
        try:
            page.goto(f"{keyed.url}/dashboard")
            page.wait_for_selector("#key-form:not([hidden])")
            page.fill("#api-key", "wrong")
            page.click("#key-form button")
            page.wait_for_selector("#key-message:has-text('not valid')")
            page.fill("#api-key", "dash-key")
            page.click("#key-form button")
            page.wait_for_selector("#connection[data-state=live]")
            assert page.evaluate("sessionStorage.getItem('jobqueue-api-key')") == "dash-key"
            job_id = submit_form(page, "pdf2image", str(DATA / "sample.pdf"), dpi="30")
            card = f".job[data-id='{job_id}']"
            page.wait_for_selector(f"{card}[data-status=succeeded]", timeout=30_000)
            # Thumbnails are <img> requests: they get in with the access token in their URL.
            thumbnails = page.locator(f"{card} img.thumbnail")
            eventually(lambda: thumbnails.evaluate_all(LOADED) == 4)
            # The last hour's chart counts this key's job, not the other key's.
            eventually(lambda: page.get_attribute("#throughput-summary", "data-total") == "1")
            assert "pdf2image 1" in page.inner_text("#throughput-summary")
        finally:
            page.close()


def test_the_last_hour_chart_counts_finished_jobs_and_follows_new_ones(browser, tmp_path):
    with run_server(tmp_path) as server, server.client() as client:
        for _ in range(3):
            assert client.post("/put", json={"seconds": 0}).status_code == 200
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        try:
            page.goto(f"{server.url}/dashboard")
            summary = "#throughput-summary"
            eventually(lambda: page.get_attribute(summary, "data-total") == "3")
            assert page.inner_text(summary).startswith("3 jobs finished in the last hour")
            # uPlot drew both charts (served from static/, within the page's CSP).
            assert page.locator("#finished-chart canvas").count() == 1
            assert page.locator("#runtime-chart canvas").count() == 1
            assert "message" in page.inner_text("#finished-chart .u-legend")
            # A job that finishes while the page is open shows up without a reload.
            assert client.post("/put", json={"seconds": 0}).status_code == 200
            eventually(lambda: page.get_attribute(summary, "data-total") == "4")
        finally:
            page.close()
        assert errors == [], "the page reported errors"
