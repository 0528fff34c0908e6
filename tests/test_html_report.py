"""report.html beside report.md: self-contained, with the tables, intervals and plots; the default study's size."""
from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest

from leukfed.simulations.html_report import CSP, render, write_html_report
from leukfed.simulations.report import write_report

CLASSES = ["Benign", "Early", "Pre", "Pro"]
METHODS = ("federated-fedavg", "centralized", "local-site-0", "local-site-1")
HEADLINE = ("accuracy", "balanced_accuracy", "auc_ovr", "macro_sensitivity", "macro_specificity")  # 4 classes
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def _final(accuracy: float) -> dict:
    return {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.01, "macro_precision": accuracy + 0.01,
            "macro_sensitivity": accuracy - 0.01, "macro_specificity": 0.9, "macro_f1": accuracy, "auc_ovr": 0.95,
            "class_names": CLASSES, "confusion_matrix": [[20, 2, 1, 1], [2, 19, 2, 1], [1, 2, 18, 3], [0, 1, 2, 21]],
            "patient_level": {"num_patients": 8, "accuracy": 0.875, "auc_ovr": 0.9, "macro_sensitivity": 0.8,
                              "macro_specificity": 0.93}}


def one_seed_results(root: str = "/data/smears") -> dict:
    """A results.json of one seed carrying every key of the stats contract."""
    accuracies = dict(zip(METHODS, (0.846, 0.861, 0.7321, 0.748)))
    methods = {}
    for name, accuracy in accuracies.items():
        method = {"final": _final(accuracy), "sample_passes": 9800 if name[0] in "fc" else 3200, "seconds": 12.0,
                  "cross_site": {"global-test": accuracy, "site-0-test": accuracy - 0.02,
                                 "site-1-test": accuracy + 0.01},
                  "history": [{"round": r, "server_evaluate": {"accuracy": 0.5 + 0.1 * r}} for r in (1, 2, 3)]
                  if name.startswith("federated") else [{"epoch": 1}],
                  "final_ci": {"accuracy": [accuracy - 0.0456, accuracy + 0.0389],
                               "balanced_accuracy": [0.7, 0.9], "auc_ovr": [0.91, 0.98],
                               "macro_sensitivity": [0.7, 0.9], "macro_specificity": [0.86, 0.94]},
                  "patient_ci": {"accuracy": [0.5, 1.0], "auc_ovr": [0.612, 1.0]},
                  "bootstrap": {"unit": "image", "resamples": 1000, "seed": 0, "level": 0.95, "method": "percentile"}}
        if name != "centralized":
            method["paired_vs_centralized"] = {key: {"diff": accuracy - 0.861, "ci": [-0.0712, -0.0031], "p": 0.0004}
                                               for key in HEADLINE}
        methods[name] = method
    return {"config": {"sites": 2, "partition": "iid", "model": "tinycnn", "rounds": 3, "local_epochs": 1, "seed": 0,
                       "image_size": 0, "pretrained": "auto"},
            "data": {"root": root, "layout": "class_folders", "class_names": CLASSES, "num_images": 1400,
                     "has_patients": False, "split": {"train": 980, "val": 210, "test": 210}},
            "partition": [{"site": f"site-{i}", "train": {c: 120 + i for c in CLASSES}, "val": {c: 26 for c in CLASSES},
                           "test": {c: 27 for c in CLASSES}} for i in range(2)],
            "methods": methods, "seconds": 95.0}


def seeds_results() -> dict:
    """A multi-seed aggregate: across_seeds and a paired t over seeds, no single-seed tables."""
    methods = {}
    for name, mean in zip(METHODS, (0.85, 0.86, 0.74, 0.75)):
        values = [mean - 0.012, mean, mean + 0.012]
        methods[name] = {"sample_passes": 29400, "seconds": 60.0,
                         "across_seeds": {"accuracy": {"mean": mean, "sd": 0.012, "ci": [mean - 0.0298, mean + 0.0298],
                                                       "values": values, "n": 3}}}
        methods[name]["across_seeds"].update({key: methods[name]["across_seeds"]["accuracy"] for key in HEADLINE})
        if name != "centralized":
            methods[name]["paired_vs_centralized"] = {key: {"diff": mean - 0.86, "ci": [-0.14, 0.02], "p": 0.21,
                                                            "test": "paired t", "n": 3, "per_seed": []}
                                                      for key in HEADLINE}
    return {"config": {"sites": 2, "partition": "iid", "model": "tinycnn", "rounds": 3, "local_epochs": 1},
            "seeds": [0, 1, 2], "split_seed": 0, "data": {"root": "/data", "layout": "class_folders",
                                                          "class_names": CLASSES, "num_images": 1400,
                                                          "split": {"train": 980, "val": 210, "test": 210}},
            "methods": methods, "seconds": 300.0}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str]:
    """report.md, the real plots and report.html, written by write_report as `leuk simulate` does."""
    out = tmp_path_factory.mktemp("report")
    write_report(out, one_seed_results())
    return out, (out / "report.html").read_text(encoding="utf-8")


def test_write_report_puts_a_self_contained_html_page_beside_report_md(written) -> None:
    out, page = written
    assert (out / "report.md").exists()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert f'http-equiv="Content-Security-Policy" content="{CSP}"' in page and "default-src 'none'" in CSP


def test_the_page_holds_every_table_with_its_intervals(written) -> None:
    _, page = written
    for heading in ("Global test set", "Per patient", "Paired difference to centralized", "Cross-site", "Partition"):
        assert heading in page, heading
    for name in (*METHODS, "site-1-test"):
        assert f"<td>{name}</td>" in page or f">{name}</th>" in page, name
    assert "<td>84.6<br><span class=\"ci\">80.0–88.5</span></td>" in page  # final_ci of federated accuracy
    assert "61.2–100.0" in page  # patient_ci
    assert "-1.5<br><span class=\"ci\">-7.1 to -0.3</span><br><span class=\"ci\">p &lt;0.001</span>" in page
    assert "1000 resamples of images" in page and "9,800" in page


def test_every_plot_is_inlined_byte_for_byte(written) -> None:
    out, page = written
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_per_round.png", "confusion_centralized.png"}
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(data) for data in inlined) == sorted(p.read_bytes() for p in pngs)
    assert page.index("accuracy_per_round.png") < page.index("confusion_centralized.png")


def test_a_multi_seed_aggregate_shows_the_spread_over_seeds(tmp_path: Path) -> None:
    path = write_html_report(tmp_path, seeds_results())
    page = path.read_text(encoding="utf-8")
    assert "Across 3 seeds" in page and "seeds 0, 1, 2" in page
    assert "85.0 ± 1.2<br><span class=\"ci\">82.0–88.0</span><br><span class=\"ci\">seeds: 83.8, 85.0, 86.2" in page
    assert "(paired t)" in page and "p 0.210" in page
    assert "Cross-site" not in page and "Partition" not in page and "<img" not in page


def test_results_without_intervals_still_render_and_say_so(tmp_path: Path) -> None:
    results = one_seed_results()
    for method in results["methods"].values():
        for key in ("final_ci", "patient_ci", "paired_vs_centralized", "bootstrap"):
            method.pop(key, None)
    page = render(results)
    assert "No intervals in this run" in page and 'class="ci"' not in page and "<td>86.1</td>" in page


def test_names_from_the_data_are_escaped(tmp_path: Path) -> None:
    page = render(one_seed_results(root='/data/<script>alert("x")</script>'))
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_the_page_loads_in_a_browser_with_no_request_leaving_it(written, tmp_path: Path) -> None:
    """Headless Chromium opens the file with every network request refused: all images decode."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no system Chromium (apt install chromium)")
    out, _ = written
    requested: list[str] = []
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        page = browser.new_page()
        page.on("request", lambda r: requested.append(r.url))
        page.goto((out / "report.html").as_uri())
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        rows = page.locator("table tr").count()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert images and all(images) and rows > 10
    assert [u for u in requested if not u.startswith(("file:", "data:"))] == []


def test_the_default_study_scores_a_few_hundred_generated_test_images(tmp_path: Path) -> None:
    """`leuk simulate` with no arguments: the generated dataset, split and partition it really uses."""
    from leukfed.common.fedconfig import FedConfig
    from leukfed.simulations.config import SimulateConfig
    from leukfed.simulations.simulate import prepare_data

    cfg = SimulateConfig(out=str(tmp_path))
    prep = prepare_data(cfg, tmp_path, lambda line: None)
    assert len(prep.split.test) >= 200
    assert all(len(site["test"]) >= 20 for site in prep.sites)  # each site's own test split, for cross-site
    assert len(set(prep.manifest.labels())) == 4
    fed = FedConfig(state_dir="x")
    assert cfg.rounds * cfg.local_epochs > fed.rounds * fed.local_epochs  # the study's own defaults, declared
