"""A real headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for
the job page and the docs. The flags are the ones this kind of machine needs: no
sandbox (root), no GPU, and no background networking (its connections to the outside
are refused here, and would only slow every start)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

CHROMIUM = os.environ.get("DRMERGE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DRMERGE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--window-size=1400,900")


def require_chromium() -> None:
    """Chromium is a system package (scripts/setup.sh installs it): say how to get it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install -y chromium chromium-driver "
                    "(bash scripts/setup.sh does it)", pytrace=False)


class Browser:
    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        require_chromium()
        self.profile = tempfile.mkdtemp(prefix="drmerge-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        # Every request the page makes (the DevTools protocol's Network events) and its console.
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        os.environ.setdefault("SE_AVOID_STATS", "true")
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        self.driver.set_page_load_timeout(60)

    def requested_urls(self) -> list[str]:
        """Every URL the browser fetched, less those its Content-Security-Policy blocked
        (they never left the browser: DevTools reports them as failed with reason csp)."""
        sent, blocked = {}, set()
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            params = msg.get("params") or {}
            if msg.get("method") == "Network.requestWillBeSent":
                sent[params["requestId"]] = params["request"]["url"]
            elif msg.get("method") == "Network.loadingFailed" and params.get("blockedReason") == "csp":
                blocked.add(params["requestId"])
        self.blocked = [url for rid, url in sent.items() if rid in blocked]
        return [url for rid, url in sent.items() if rid not in blocked]

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
