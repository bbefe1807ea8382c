"""The web UI in a real headless Chromium against a live stack (HTTP API, Redis, a Celery worker,
the database): sign in, upload generated films, watch them finish, sort and filter the results,
open an image with its heat map, download the CSV, sign out; a wrong key and another client's
job are refused.  Skips, saying why, only where Chromium, chromedriver or selenium is missing.

With ``CXR_SCREENSHOTS=1`` it saves docs/screenshots/job.png and image.png (generated films
only, never a patient's)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import make_key, mark_encrypted, png_bytes, submit, with_key, zip_bytes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"
HOSTILE = "<b>film.png"  # shown as text, never as markup
WAIT = 30  # seconds for a page to do what it says
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _find(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((path for name in names if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One headless Chromium for the module (each test clears its cookies)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    chromium = _find("CXR_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    chromedriver = _find("CXR_CHROMEDRIVER", "chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(
            "Chromium or chromedriver not found (apt-get install chromium chromium-driver, "
            "or set CXR_CHROMIUM and CXR_CHROMEDRIVER); .ci/run installs them as root"
        )
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": 0}
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(chromedriver), options=options)
    chrome.downloads = downloads  # type: ignore[attr-defined]
    chrome.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    yield chrome
    chrome.quit()


@pytest.fixture
def browser(driver):
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.set_window_size(1280, 1000)
    driver.get_log("browser")  # drop what earlier tests logged
    yield driver
    problems = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Content Security Policy" in e["message"]
    ]
    assert not problems, problems  # nothing the page does is blocked by its own policy


# ---------------------------------------------------------------------------------- helpers


def wait(driver, condition, timeout: float = WAIT, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: condition(d), message=what
    )


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def css_all(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def sign_in(driver, url: str, key: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: "/signin" in d.current_url, what="the sign-in page")
    css(driver, "#api_key").send_keys(key)
    css(driver, "form.form button[type=submit]").click()


def table(driver) -> list[dict[str, str]]:
    rows = []
    for row in css_all(driver, "#results tbody tr"):
        cells = [td.text for td in row.find_elements("css selector", "td")]
        rows.append(
            dict(zip(("file", "status", "probability", "label", "reason"), cells, strict=False))
        )
    return rows


def probabilities(rows: list[dict[str, str]]) -> list[float]:
    return [float(r["probability"]) for r in rows if r["probability"] != "—"]


def unlabelled_controls(driver) -> list[str]:
    return driver.execute_script(
        """return Array.from(document.querySelectorAll('input, select, textarea'))
          .filter(el => el.type !== 'hidden' && !el.labels.length && !el.getAttribute('aria-label'))
          .map(el => el.outerHTML);"""
    )


def overflows(driver) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth > document.documentElement.clientWidth;"
    )


def image_loaded(driver, selector: str) -> bool:
    return driver.execute_script(
        "const i = document.querySelector(arguments[0]);"
        "return !!i && !i.hidden && i.complete && i.naturalWidth > 0;",
        selector,
    )


def screenshot(driver, name: str) -> None:
    if os.environ.get("CXR_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1280, 1400)
        driver.save_screenshot(str(SCREENSHOTS / name))
        driver.set_window_size(1280, 1000)


def films(folder: Path) -> dict[str, Path]:
    """Generated films on disk, as a reader would pick them: files, a zip and a folder."""
    folder.mkdir()
    paths = {}
    for name, data in [
        ("film-1.png", png_bytes(11)),
        ("film-2.png", png_bytes(12, height=300, width=260)),
        (HOSTILE, png_bytes(13)),
        ("notes.png", b"minutes of the meeting, not an image"),
        ("batch.zip", zip_bytes({"zipped/a.png": png_bytes(14), "zipped/b.png": png_bytes(15)})),
    ]:
        paths[name] = folder / name
        paths[name].write_bytes(data)
    scans = folder / "ward-7"
    scans.mkdir()
    for n in (16, 17):
        (scans / f"scan-{n}.png").write_bytes(png_bytes(n))
    paths["ward-7"] = scans
    return paths


# ------------------------------------------------------------------------------------ tests


def test_a_reader_signs_in_uploads_and_reads_the_results(
    browser, live_server, start_worker, api_key, app, tmp_path
) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    worker = start_worker(wait=False)  # loads its model while the reader signs in
    sign_in(browser, live_server, api_key)
    wait(browser, lambda d: d.current_url == live_server + "/", what="the jobs list")
    assert browser.get_cookie("cxr_session")["httpOnly"]

    browser.get(live_server + "/upload")
    assert not unlabelled_controls(browser)
    paths = films(tmp_path / "films")
    files = [str(paths[n]) for n in ("film-1.png", "film-2.png", HOSTILE, "notes.png", "batch.zip")]
    css(browser, "#file-input").send_keys("\n".join(files))
    css(browser, "#folder-input").send_keys(str(paths["ward-7"]))
    wait(browser, lambda d: "7 files chosen" in css(d, "#selection-summary").text)
    css(browser, "#client-ref").send_keys("ward 7, morning round")
    css(browser, "#upload-button").click()
    wait(browser, lambda d: re.search(f"/jobs/{UUID}$", d.current_url), what="the job page")
    job_id = browser.current_url.rsplit("/", 1)[1]

    worker.wait_ready()
    wait(
        browser,
        lambda d: css(d, "#job").get_attribute("data-settled") == "true",
        timeout=240,
        what="the job to finish and its table to load",
    )
    assert css(browser, "#job-status").text == "completed with errors"
    assert css(browser, "#results-summary").text == "Showing 8 of 8 images."
    rows = table(browser)
    assert {r["file"] for r in rows} == {
        "film-1.png",
        "film-2.png",
        HOSTILE,
        "notes.png",
        "zipped/a.png",
        "zipped/b.png",
        "ward-7/scan-16.png",
        "ward-7/scan-17.png",
    }
    assert browser.execute_script("return document.querySelectorAll('#results b').length") == 0
    # flagged first, by probability: the default order
    ranks = [{"Flagged": 0, "Not flagged": 1}.get(r["label"], 2) for r in rows]
    assert ranks == sorted(ranks)
    flagged = probabilities([r for r in rows if r["label"] == "Flagged"])
    assert flagged == sorted(flagged, reverse=True)
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["file"] == "notes.png"
    assert failed["reason"].startswith("not_an_image: ")

    # sorting with the keyboard: the heading's button, Enter then Space
    heading = css(browser, 'th[data-sort="probability"]')
    heading.find_element("css selector", "button").send_keys(Keys.ENTER)
    assert heading.get_attribute("aria-sort") == "descending"
    assert probabilities(table(browser)) == sorted(probabilities(rows), reverse=True)
    heading.find_element("css selector", "button").send_keys(Keys.SPACE)
    assert heading.get_attribute("aria-sort") == "ascending"
    assert probabilities(table(browser)) == sorted(probabilities(rows))
    focused = browser.execute_script(
        "return getComputedStyle(document.activeElement).outlineStyle;"
    )
    assert focused != "none"  # the focused heading button shows it

    Select(css(browser, "#filter-status")).select_by_value("failed")
    assert [r["file"] for r in table(browser)] == ["notes.png"]
    Select(css(browser, "#filter-status")).select_by_value("")
    Select(css(browser, "#filter-label")).select_by_value("covid")
    assert {r["label"] for r in table(browser)} <= {"Flagged"}
    Select(css(browser, "#filter-label")).select_by_value("")
    css(browser, "#filter-min").send_keys("0.2")
    assert all(p >= 0.2 for p in probabilities(table(browser)))
    css(browser, "#filter-min").clear()
    browser.execute_script(
        "document.getElementById('filter-min').dispatchEvent(new Event('input'))"
    )
    assert len(table(browser)) == 8
    assert not unlabelled_controls(browser)
    browser.execute_script("window.scrollTo(0, 0)")
    css(browser, 'th[data-sort="label"] button').click()  # back to flagged first
    screenshot(browser, "job.png")
    browser.set_window_size(768, 1024)  # a tablet held upright
    assert not overflows(browser)
    browser.set_window_size(1280, 1000)

    # the CSV, downloaded with the session cookie
    csv_file = browser.downloads / f"job-{job_id}.csv"
    css(browser, "#csv-link").click()
    wait(browser, lambda d: csv_file.is_file() and csv_file.stat().st_size > 0, what="the CSV")
    exported = list(csv.DictReader(io.StringIO(csv_file.read_text(encoding="utf-8"))))
    assert {r["filename"] for r in exported} == {r["file"] for r in rows}

    # an image: film, heat map, probability, label, threshold, model version, the warning
    scored = next(r for r in table(browser) if r["status"] == "completed")
    browser.find_element("link text", scored["file"]).click()
    wait(browser, lambda d: re.search(f"/images/{UUID}$", d.current_url), what="the image page")
    wait(browser, lambda d: image_loaded(d, "#film"), what="the film")
    text = css(browser, "main").text
    assert "A screening aid, not a diagnosis." in text
    assert f"Probability of COVID-19\n{scored['probability']}" in text
    assert f"Label\n{scored['label']}" in text
    model = app.extensions["cxr"].model
    assert f"Threshold\n{model.threshold:.3f}" in text
    assert f"Model version\n{model.version}" in text
    if "images.get_heatmap" in app.view_functions:
        wait(browser, lambda d: image_loaded(d, "#heatmap"), timeout=180, what="the heat map")
        slider = css(browser, "#heatmap-opacity")
        slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
        assert float(css(browser, "#heatmap").value_of_css_property("opacity")) < 1
        slider.send_keys(Keys.END)
    else:  # the heat map endpoint is another change's; the page says so meanwhile
        wait(browser, lambda d: "not available" in css(d, "#heatmap-status").text)
    assert not unlabelled_controls(browser)
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    screenshot(browser, "image.png")
    browser.set_window_size(768, 1024)
    assert not overflows(browser)
    browser.set_window_size(1280, 1000)

    css(browser, "form.signout button").click()
    wait(browser, lambda d: "/signin" in d.current_url, what="the sign-in page")
    assert browser.get_cookie("cxr_session") is None
    browser.get(f"{live_server}/jobs/{job_id}")
    assert "/signin" in browser.current_url


def test_a_wrong_key_is_refused(browser, live_server) -> None:
    sign_in(browser, live_server, "cxr_" + "w" * 43)
    wait(browser, lambda d: "unknown or has been revoked" in css(d, "#signin-error").text)
    assert browser.current_url.endswith("/signin")
    assert browser.get_cookie("cxr_session") is None
    assert css(browser, "#api_key").get_attribute("value") == ""  # not echoed back


def test_another_clients_job_is_refused(browser, live_server, app, db_sessions, api_key) -> None:
    theirs = submit(with_key(app.test_client(), api_key), [("a.png", png_bytes(21))])
    sign_in(browser, live_server, make_key(db_sessions, "another-hospital"))
    wait(browser, lambda d: d.current_url == live_server + "/", what="the jobs list")
    assert "No jobs yet" in css(browser, "main").text
    for path in (f"/jobs/{theirs['id']}", f"/images/{theirs['images'][0]['id']}"):
        browser.get(live_server + path)
        assert css(browser, "h1").text == "Not available"
        assert "a.png" not in browser.page_source
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => done(r.status));",
        f"/v1/jobs/{theirs['id']}",
    )
    assert status == 404


def test_a_refused_upload_is_explained_in_words(browser, live_server, api_key, tmp_path) -> None:
    locked = tmp_path / "locked.zip"
    locked.write_bytes(mark_encrypted(zip_bytes({"a.png": png_bytes(31)})))
    sign_in(browser, live_server, api_key)
    wait(browser, lambda d: d.current_url == live_server + "/", what="the jobs list")
    browser.get(live_server + "/upload")
    css(browser, "#file-input").send_keys(str(locked))
    css(browser, "#upload-button").click()
    error = wait(browser, lambda d: css(d, "#upload-error").text, what="the refusal")
    assert error.startswith("A zip archive is password-protected: unzip it first.")
    assert "(encrypted_zip_entry)" in error
    assert browser.current_url == live_server + "/upload"
