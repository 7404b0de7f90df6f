"""The dashboard in a real headless Chromium (Debian's, driven by playwright)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from conftest import DATA, ROOT

ARTIFACTS = ROOT / "tests" / "artifacts"
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
    page.wait_for_function(f"document.querySelector('{row} .workers').textContent === '4'")
    assert page.inner_text(f"{row} .capacity") == "64"


def test_pdf_through_the_form_shows_progress_and_thumbnails(page):
    job_id = submit_form(page, "pdf2image", str(DATA / "sample.pdf"), dpi="100")
    card = f".job[data-id='{job_id}']"
    page.wait_for_selector(card)  # it appears at once, from the event stream
    page.wait_for_selector(f"{card}[data-status=succeeded]", timeout=30_000)
    page.wait_for_function(f"document.querySelector(\"{card} .fill\").style.width === '100%'")
    assert page.inner_text(f"{card} .progress-text") == "4 of 4 pages"
    thumbnails = f"{card} img.thumbnail"
    page.wait_for_function(
        f"[...document.querySelectorAll(\"{thumbnails}\")].filter(i => i.complete && "
        "i.naturalWidth === 160).length === 4")
    first = page.locator(thumbnails).first.evaluate("i => i.src")
    assert first.endswith("/files/page-001.png?w=160")
    result = page.locator(f"{card} a.result")
    assert result.get_attribute("href") == f"/jobs/{job_id}/result"


def test_video_through_the_form_plays_its_preview(page):
    job_id = submit_form(page, "video", str(DATA / "sample.mp4"), width="320")
    card = f".job[data-id='{job_id}']"
    page.wait_for_selector(f"{card}[data-status=succeeded]", timeout=60_000)
    preview = page.locator(f"{card} img.preview")
    preview.wait_for()
    page.wait_for_function(f"document.querySelector(\"{card} img.preview\").naturalWidth > 0")
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
