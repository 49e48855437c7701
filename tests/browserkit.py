"""The dashboard driven in a real headless Chromium (Debian's chromium and chromium-driver,
through selenium), for the controller tests and the lab's: the browser, numbered screenshots
kept as artefacts, and waits that read the live pages."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_CLONE_NEWNET = 0x40000000

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[test]' brings selenium")
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def artefact_dir(name: str) -> Path:
    """Where a test's screenshots stay after the run (var/ is not in git): BASTION_ARTIFACTS,
    else var/artifacts; a dashboard/<test> folder emptied first, and printed."""
    root = Path(os.environ.get("BASTION_ARTIFACTS") or REPO / "var" / "artifacts") / "dashboard"
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"\nscreenshots: {out}")
    return out


@contextlib.contextmanager
def chrome(profile: Path, size: str = "1280,1000"):
    """A headless Chromium under chromium-driver, quit however the test ends."""
    if CHROMIUM is None or not Path(CHROMEDRIVER).exists():
        pytest.skip("chromium and chromium-driver are not installed (tools/setup installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # The flags keep it off the network it has no business with here.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", f"--user-data-dir={profile}", f"--window-size={size}"):  # fmt: skip
        opts.add_argument(flag)
    # the page's console (CSP violations, failed loads) for browser_errors()
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def in_namespace(ns: str):
    """This thread in network namespace `ns` (ip netns) for a while: the sockets it makes and
    the processes it starts (chromium-driver, Chromium) live there; it goes back after."""
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if libc.setns(here, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


class Steps:
    """Screenshots numbered in the order taken."""

    def __init__(self, driver, out: Path):
        self.driver, self.out, self.n = driver, out, 0

    def shot(self, name: str) -> Path:
        """The whole page, below the fold too (DevTools' captureBeyondViewport)."""
        self.n += 1
        path = self.out / f"{self.n:02d}-{name}.png"
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        png = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path.write_bytes(base64.b64decode(png["data"]))
        return path


def browser_errors(driver) -> list[str]:
    """What the page's console logged as errors since the last call (a script refused by the
    page's Content-Security-Policy, a file that did not load, an uncaught exception)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


_RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", e =>
  window.cspViolations.push(`${e.effectiveDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));
"""


# What markup slipped into a page would try: an inline <script> and an onerror= handler. Both set
# window.injected if the page's policy lets them run (csp_violations records each refusal).
INJECT_MARKUP = """
const box = document.createElement("div");
box.innerHTML = '<img src="/no-such-image.png" onerror="window.injected = \\'onerror\\'">';
document.body.append(box);
const s = document.createElement("script");
s.textContent = "window.injected = 'inline script'";
document.body.append(s);
"""


def record_csp_violations(driver) -> None:
    """From the next page loaded on: what the page's Content-Security-Policy refuses, kept in
    the page as "directive blocked-URI source:line" for csp_violations(). Added through DevTools,
    the listener runs before the page's own scripts and is not subject to the page's policy."""
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORD_VIOLATIONS})


def csp_violations(driver) -> list[str]:
    """What the current page's policy refused since it loaded (record_csp_violations first)."""
    return driver.execute_script("return window.cspViolations")


def until(driver, pred, what: str, timeout: float = 30):
    # The pages rebuild their tables as they poll: an element read mid-rebuild is asked again.
    # The deadline only guards against a hang.
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(pred, what)


def wait_text(driver, css: str, pattern: str, timeout: float = 30) -> str:
    """The text of `css` once it matches `pattern`."""
    def seen(d):
        els = d.find_elements(By.CSS_SELECTOR, css)
        return els and re.search(pattern, els[0].text) and els[0].text
    return until(driver, seen, f"{css} !~ {pattern}", timeout)


def stages(driver) -> list[str]:
    """The machine page's boot timeline, its steps in order."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#timeline tbody tr')].map(r => r.dataset.stage)")


def wait_stages(driver, *want: str, timeout: float = 30) -> list[str]:
    return until(driver, lambda d: all(w in stages(d) for w in want) and stages(d),
                 f"timeline with {want}", timeout)


def press(driver, machine: str, state: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'button[data-machine="{machine}"][data-state="{state}"]').click()


def confirm(driver, steps: Steps, name: str) -> None:
    """Answer the page's confirmation dialog with yes, after its screenshot."""
    until(driver, lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None, "dialog")
    steps.shot(name)
    driver.find_element(By.ID, "confirm-ok").click()


def log_in(driver, token: str) -> None:
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    wait_text(driver, "#who", "logged in")
