"""/docs in a real headless Chromium (Debian's, through chromium-driver and selenium;
tests/browserkit.py) against a real `bastion serve`: Swagger UI draws the controller's API from
files the controller serves itself, under the page's Content-Security-Policy, with no console
error and no request anywhere else; its "Authorize" takes the API token, and "Try it out" then
gets through to an endpoint that needs it. Every step leaves a screenshot under the directory
the test prints."""

from __future__ import annotations

import pytest
from bastion_testkit import TOKEN, Server
from browserkit import Steps, artefact_dir, browser_errors, chrome, until, wait_text
from selenium.webdriver.common.by import By

from bastion import paths
from bastion.api import apidocs

CHECK_TOKEN = "#operations-system-check_token_api_v1_auth_get"  # GET /api/v1/auth


@pytest.fixture
def served(tmp_path, site_dir):
    if apidocs.missing():
        pytest.skip(f"Swagger UI is not installed in {paths.web_dir()}: run tools/setup")
    srv = Server(site_dir, tmp_path / "events.db", TOKEN)
    try:
        yield srv
    finally:
        srv.stop()


def try_it(d, op: str) -> str:
    """Expand the operation, press "Try it out" (once) and "Execute": the status it got; then
    "Clear", for the next time."""
    block = d.find_element(By.CSS_SELECTOR, op)
    if "is-open" not in block.get_attribute("class"):
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    for b in block.find_elements(By.CSS_SELECTOR, ".try-out__btn"):
        if b.text.strip() == "Try it out":
            b.click()
    until(d, lambda d: block.find_elements(By.CSS_SELECTOR, ".execute"), "Execute")
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait_text(d, f"{op} .live-responses-table tr.response .response-col_status", r"^\d{3}")[:3]
    block.find_element(By.CSS_SELECTOR, ".btn-clear").click()
    until(d, lambda d: not block.find_elements(By.CSS_SELECTOR, ".live-responses-table"), "cleared")
    return status


def test_swagger_ui_draws_the_api_from_the_controller_and_takes_the_token(served, tmp_path, request):
    srv = served
    steps = Steps(None, artefact_dir(request.node.name))
    with chrome(tmp_path / "chromium") as d:
        steps.driver = d
        d.get(srv.url + "/docs")
        assert wait_text(d, ".swagger-ui .info .title", "Edge Bastion controller")
        until(d, lambda d: d.find_elements(By.CSS_SELECTOR, CHECK_TOKEN), "the operations")
        ops = d.execute_script("return [...document.querySelectorAll('.opblock')].map(e => e.id)")
        assert "operations-machines-list_machines_api_v1_machines_get" in ops
        assert "operations-device-machine_power_api_v1_machines__name__power_post" in ops
        steps.shot("docs")
        # nothing refused by the page's policy, nothing failed, nothing asked of anyone else
        assert browser_errors(d) == []
        loaded = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert f"{srv.url}/docs/vendor/swagger-ui-bundle.js" in loaded
        assert f"{srv.url}/openapi.json" in loaded
        assert [u for u in loaded if not u.startswith(srv.url + "/")] == []

        # without the token the controller refuses; "Authorize" with it, and it lets the same
        # request through
        assert try_it(d, CHECK_TOKEN) == "401"
        steps.shot("refused-without-token")
        assert [e for e in browser_errors(d) if "status of 401 (Unauthorized)" not in e] == []
        d.find_element(By.CSS_SELECTOR, ".btn.authorize").click()
        box = until(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".auth-container input"), "the token box")[0]
        box.send_keys(TOKEN)
        d.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
        steps.shot("authorized")
        d.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done").click()
        assert try_it(d, CHECK_TOKEN) == "200"
        steps.shot("accepted-with-token")
        assert browser_errors(d) == []
