"""The job page (/ui) in a real headless Chromium against the real service (uvicorn,
Redis, a Celery worker, S3): the page asks for a key, lists a running job with a live
progress bar from its event stream, and shows it succeed with its events and its result
files as download links. Also: /docs renders with every request on the API's own origin.

``DRMERGE_UI_SCREENSHOT=docs/ui.png`` saves the page's screenshot there (the README's).
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.browser import Browser


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def _wait(driver, predicate, timeout: float = 90.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate(driver)
            if value:
                return value
        except Exception as e:  # an element replaced while we looked: look again
            last_error = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} ({last_error}); the page shows:\n"
                         f"{driver.find_element('tag name', 'body').text}")


def test_the_page_lists_a_running_job_and_shows_it_succeed(service_stack, slow_family, browser):
    from selenium.webdriver.common.by import By

    d = browser.driver
    page = service_stack.api_url + "/ui"
    r = httpx.get(service_stack.api_url + "/ui/", timeout=30)
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    d.get(page)
    assert d.current_url == service_stack.api_url + "/ui/"
    assert d.find_element(By.ID, "key-form").is_displayed() and not d.find_element(By.ID, "main").is_displayed()

    # A wrong key is refused and asked for again.
    d.find_element(By.ID, "api-key").send_keys("drm_not-a-real-key")
    d.find_element(By.CSS_SELECTOR, "#key-form button").click()
    _wait(d, lambda d: "refused" in d.find_element(By.ID, "notice").text, 30, "the refusal")
    assert d.find_element(By.ID, "key-form").is_displayed()
    browser.console_errors()  # (reading the log empties it: the refused key's 401 was expected)

    bad = slow_family.spec("merged/ui-fails/")
    bad["models"][0] = {"model": f"s3://{slow_family.bucket}/no-such-model/"}
    failed = service_stack.submit(bad)
    assert service_stack.wait(failed["id"])["status"] == "failed"
    job = service_stack.submit(slow_family.spec("merged/ui/"), metadata={"from": "the browser test"})
    d.find_element(By.ID, "api-key").send_keys(service_stack.api_key)
    d.find_element(By.CSS_SELECTOR, "#key-form button").click()
    row = f'tr[data-job-id="{job["id"]}"]'
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, row), 30, "the job's row")

    # Running, with a bar that moves (the job's event stream feeds it).
    _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "running", 60,
          "the job running")
    d.find_element(By.CSS_SELECTOR, row).click()
    _wait(d, lambda d: d.find_element(By.ID, "detail").get_attribute("data-job-id") == job["id"], 30, "the detail")
    seen = set()

    def moving(d):
        v = int(d.find_element(By.CSS_SELECTOR, f"{row} [role=progressbar]").get_attribute("aria-valuenow"))
        seen.add(v)
        status = d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status")
        return status == "succeeded" and 100 in seen

    _wait(d, moving, 120, "the job to succeed")
    assert any(0 < v < 100 for v in seen), seen  # it was seen part-way, live
    failed_row = d.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{failed["id"]}"]')
    assert failed_row.get_attribute("data-status") == "failed" and "100%" not in failed_row.text
    detail = d.find_element(By.ID, "detail")
    _wait(d, lambda d: d.find_element(By.ID, "detail").get_attribute("data-status") == "succeeded", 30,
          "the detail to show success")
    assert d.find_element(By.ID, "d-bar").get_attribute("aria-valuenow") == "100"
    events = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#d-events li")]
    assert any("running on" in e for e in events) and any("succeeded" in e for e in events), events
    assert "from=the browser test" in detail.find_element(By.ID, "d-metadata").text
    links = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#d-files a"), 30, "the result files")
    names = [a.text for a in links]
    assert "model.safetensors" in names
    href = links[names.index("model.safetensors")].get_attribute("href")
    assert href.startswith(service_stack.settings.s3_endpoint_url) and "X-Amz-Signature=" in href
    assert httpx.get(href, timeout=30).status_code == 200

    # The key lives in this tab's sessionStorage only, and never in a URL.
    assert d.execute_script("return sessionStorage.getItem('drmerge.apiKey')") == service_stack.api_key
    assert d.execute_script("return localStorage.length") == 0
    urls = browser.requested_urls()
    assert urls and not any(service_stack.api_key in u for u in urls)
    api = urlsplit(service_stack.api_url)
    web = [u for u in urls if u.startswith(("http://", "https://"))]  # not the browser's own chrome:// pages
    assert web and all(urlsplit(u).netloc == api.netloc for u in web), web
    assert not browser.console_errors(), browser.console_errors()

    shot = os.environ.get("DRMERGE_UI_SCREENSHOT")
    if shot:
        d.save_screenshot(shot)

    # Forgetting the key hides the jobs.
    d.find_element(By.ID, "forget-key").click()
    assert d.execute_script("return sessionStorage.getItem('drmerge.apiKey')") is None
    assert not d.find_element(By.ID, "main").is_displayed()


def test_docs_render_offline_from_the_api_itself(idle_stack, browser):
    from selenium.webdriver.common.by import By

    d = browser.driver
    d.get(idle_stack.api_url + "/docs")
    title = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"), 60, "Swagger UI")
    assert "drmerge" in title[0].text
    assert d.find_elements(By.CSS_SELECTOR, ".opblock-tag"), "no operations rendered"
    d.get(idle_stack.api_url + "/redoc")
    _wait(d, lambda d: "Submit a merge" in d.find_element(By.TAG_NAME, "body").text, 60, "ReDoc")
    api = urlsplit(idle_stack.api_url).netloc
    outside = [u for u in browser.requested_urls() if u.startswith(("http://", "https://")) and urlsplit(u).netloc != api]
    assert not outside, outside
    assert all(urlsplit(u).netloc != api for u in browser.blocked)  # what the page would have fetched from outside
