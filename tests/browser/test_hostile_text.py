"""A site controls some text the dashboard shows (its error reasons, the class names it reports): the page
must show it as text, never run it. A state folder written as a hostile site's replies would leave it."""
from __future__ import annotations

import json
import time
from pathlib import Path

from browser_pages import open_page, screenshot

from leukfed.server.dashboard import serve_dashboard

PAYLOAD = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def hostile_state(folder: Path) -> Path:
    row = {"round": 1, "sites_sampled": 2, "sites_replied": 1, "time": time.time(), "round_seconds": 1.0,
           "sites": {"11": {"name": "a", "train": {"train_loss": 1.0}, "evaluate": {"eval_accuracy": 0.5}}},
           "failures": [{"node": 22, "phase": "train", "reason": PAYLOAD}],
           "rejected": [{"node": 22, "site": "b", "reason": f"evaluation reply: {PAYLOAD}"}],
           "train": {"train_loss": 1.0}, "evaluate": {"eval_accuracy": 0.5}, "server_evaluate": {}}
    folder.mkdir()
    (folder / "history.json").write_text(json.dumps([row]))
    (folder / "MODEL_CARD.md").write_text(PAYLOAD)
    (folder / "status.json").write_text(json.dumps({"phase": PAYLOAD, "round": 1, "total_rounds": 2,
                                                    "sites": {"a": 11, "b": 22}}))
    return folder


def test_text_from_sites_is_shown_never_run(tmp_path: Path, browser, screenshots: Path) -> None:
    server = serve_dashboard(hostile_state(tmp_path / "state"), "127.0.0.1:0", say=lambda _: None)
    try:
        page = open_page(browser, server.url)
        page.wait_for_selector("#events tbody tr", timeout=30_000)
        assert PAYLOAD in page.inner_text("#events") and PAYLOAD in page.inner_text("#phase")
        assert page.locator("main img, main script").count() == 0
        assert page.title() == "leukfed coordinator"
        screenshot(page, screenshots, "hostile-text")
        assert page.errors == []
    finally:
        server.stop()
