"""The dashboard and the console in a real headless Chromium, against a live loopback federation: a
coordinator with --dashboard, hospital a (honest, with --console) and site b, whose updates lie about
their example count and are rejected every round."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser_pages import open_page, screenshot
from poisoned_nodes import Federation

from leukfed.common.flower.env import free_port
from leukfed.simulations.loopback import wait_for

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra").expect
ROUNDS = 2
REJECTION = "num-examples 1000000000 exceeds the bound 1000000 per site"


@dataclass
class Live:
    federation: Federation
    server: object
    dashboard: str
    console: str


@pytest.fixture(scope="module")
def live(tmp_path_factory, browser) -> Live:   # browser first: no federation is started where it is skipped
    root = tmp_path_factory.mktemp("federation")
    federation = Federation(root, ["a", "b"])
    dashboard, console = free_port(), free_port()
    try:
        server = federation.server("--batch-size", "16", "--rounds", str(ROUNDS), "--min-sites", "2",
                                   "--round-timeout", "60", "--dashboard", f"127.0.0.1:{dashboard}")
        federation.wait_submitted()   # the sites' keys are registered
        federation.client("a", root / "data-a", "--console", str(console))
        federation.stock_node("b", federation.certs / "sites" / "b", scale=1.0, examples=10**9)
        yield Live(federation, server, f"http://127.0.0.1:{dashboard}/", f"http://localhost:{console}/")
    finally:
        federation.close()


def test_the_dashboard_shows_the_run_live_by_site_name(live: Live, browser, screenshots: Path) -> None:
    wait_for(lambda: "dashboard: http://127.0.0.1" in live.federation.log("server.log"), 60, "the dashboard")
    page = open_page(browser, live.dashboard)
    # (expect() polls without eval: the page's CSP forbids it, even to the test)
    expect(page.locator("#round")).to_have_text(re.compile(rf"round \d+ of {ROUNDS}"), timeout=120_000)
    first = int(page.inner_text("#round").split()[1])
    later = "|".join(str(r) for r in range(first + 1, ROUNDS + 1))
    # The page updates itself (no reload): the round it shows moves on.
    expect(page.locator("#round")).to_have_text(re.compile(rf"round ({later}) of {ROUNDS}|finished.*"), timeout=120_000)
    page.wait_for_selector("#chart-accuracy svg circle", timeout=60_000)
    sites = page.locator("#sites tbody tr strong").all_inner_texts()
    assert sites == ["a", "b"]
    assert REJECTION in page.inner_text("#events")
    assert REJECTION in page.locator("#sites tbody tr").nth(1).inner_text()   # b's row names why
    assert page.locator("#chart-accuracy svg circle").count() >= 1
    assert page.locator("#chart-loss svg polyline").count() >= 1
    assert "a" in page.locator("#chart-accuracy .legend").inner_text()
    assert page.locator("#time-split svg rect").count() >= 5
    screenshot(page, screenshots, "dashboard-live")
    assert page.errors == []


def test_the_console_shows_approvals_audit_policy_budget_and_data(live: Live, browser, screenshots: Path) -> None:
    site = live.federation.root / "site-a"
    wait_for(lambda: (site / "audit.jsonl").exists(), 180, "site a's first task")
    page = open_page(browser, live.console)
    page.wait_for_selector("#audit-verdict", timeout=30_000)
    assert page.inner_text("#audit-verdict") == "verified"
    approval = json.loads((site / "approvals.json").read_text())["approvals"][-1]
    assert page.inner_text("#approvals .reviewer") == "loopback reviewer"
    assert page.inner_text("#approvals .code-digest") == approval["code_digest"]
    assert page.inner_text("#installed-status") == "installed code matches the approval in force"
    policy = {row.get_attribute("data-setting"): row.inner_text() for row in page.locator(".policy-value").all()}
    assert policy["min-sites"] == "2" and policy["min-metric-examples"] == "1" and policy["max-batch-size"] == "1024"
    assert "no DP training" in page.inner_text("#privacy")
    assert page.inner_text("#data-verdict") == "usable"
    assert re.search(r"40 images in 4 classes", page.inner_text("#data"))
    screenshot(page, screenshots, "console")
    assert page.errors == []


def test_the_finished_run_shows_its_export_and_card(live: Live, browser, screenshots: Path) -> None:
    from leukfed.server.dashboard import serve_dashboard

    assert live.server.wait(timeout=300) == 0, live.federation.log("server.log")
    state = live.federation.state
    card = state / "MODEL_CARD.md"
    if not card.exists():   # written by the run export where that is installed; the page shows whatever is there
        card.write_text("# Model card\n\nIntended use: research only <b>not bold</b>\n")
    server = serve_dashboard(state, "127.0.0.1:0", say=lambda _: None)   # the state folder outlives leuk-server
    try:
        page = open_page(browser, server.url)
        page.wait_for_selector("#model-card:not([hidden])", timeout=30_000)
        assert page.inner_text("#round") == f"finished: {ROUNDS} of {ROUNDS} rounds"
        assert page.inner_text("#phase") == "finished"
        assert "tinycnn" in page.inner_text("#model") and "Benign, Early, Pre, Pro" in page.inner_text("#model")
        assert card.read_text().splitlines()[0] in page.inner_text("#model-card")
        runs = page.locator("#runs tbody tr").first.inner_text()
        assert "tinycnn" in runs and str(ROUNDS) in runs
        screenshot(page, screenshots, "dashboard-finished")
        assert page.errors == []
    finally:
        server.stop()
