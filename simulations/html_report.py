"""`report.html`: a `leuk simulate` comparison as one self-contained page (tables, intervals, plots inline)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from leukfed.common.atomic import atomic_write_text

HTML_FILE = "report.html"
METRICS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "macro_precision": "Precision",
           "macro_sensitivity": "Sensitivity", "macro_specificity": "Specificity", "macro_f1": "F1",
           "auc_ovr": "AUC", "auc": "AUC", "sensitivity": "Sensitivity", "specificity": "Specificity"}
TABLE_METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_sensitivity", "macro_specificity",
                 "macro_f1", "auc_ovr")
PATIENT_METRICS = ("auc", "auc_ovr", "sensitivity", "macro_sensitivity", "specificity", "macro_specificity",
                   "accuracy")
PLOT_ORDER = ("accuracy_per_round.png", "label_distribution.png")
# The page may load nothing but its own inline style and data: images, whatever a results.json holds.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d8dde6}
p.lead{color:#4a5568}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d8dde6;padding:.3em .6em;text-align:right;vertical-align:top}
th{background:#f1f4f8}td:first-child,th:first-child{text-align:left;font-weight:600}
.ci{color:#5a6577;font-size:.85em;white-space:nowrap}.note{color:#5a6577;font-size:.9em}
.wide{overflow-x:auto}
.bar{position:relative;width:110px;height:12px;background:#eef1f5;border-radius:2px;display:inline-block}
.bar span{position:absolute;top:0;height:12px;background:#8fb3e8;border-radius:2px}
.bar i{position:absolute;top:-2px;width:2px;height:16px;background:#1f4f99}
.better{color:#1d7a3a}.worse{color:#a4262c}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #d8dde6}figcaption{font-size:.85em;color:#5a6577}
"""


def write_html_report(out: Path, results: dict) -> Path:
    """Write OUT/report.html for `results` (one seed or several), with OUT's PNG plots inline."""
    path = Path(out) / HTML_FILE
    atomic_write_text(path, render(results, Path(out)))
    return path


def render(results: dict, out: Path | None = None) -> str:
    """The whole page; plots are read from `out` when given."""
    sections = [_summary(results), _method_section(results), _seeds_section(results), _paired_section(results),
                _patient_section(results), _cross_site_section(results), _partition_section(results),
                _plots_section(out) if out else ""]
    title = "Federated vs centralized vs local-only"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _interval(ci) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f'<br><span class="ci">{100 * ci[0]:.1f}–{100 * ci[1]:.1f}</span>'


def _cell(value, ci=None) -> str:
    return f"<td>{_pct(value)}{_interval(ci)}</td>"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """`rows` hold ready <td> cells, except the first (a plain label, escaped here)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(f"<tr><td>{_e(row[0])}</td>{''.join(row[1:])}</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _bar(value, ci) -> str:
    """The value as a tick on a 0-100 % scale, its interval as a shaded span (pure CSS)."""
    if value is None:
        return "<td></td>"
    span = ""
    if ci and ci[0] is not None and ci[1] is not None:
        span = f'<span style="left:{100 * ci[0]:.1f}%;width:{100 * (ci[1] - ci[0]):.1f}%"></span>'
    return f'<td><div class="bar" title="{_pct(value)} %">{span}<i style="left:{100 * value:.1f}%"></i></div></td>'


def _summary(results: dict) -> str:
    cfg, data = results.get("config", {}), results.get("data", {})
    split = data.get("split", {})
    seeds = results.get("seeds")
    runs = f"seeds {', '.join(map(str, seeds))}" if seeds else f"seed {cfg.get('seed', 'n/a')}"
    epochs = cfg.get("rounds", 0) * cfg.get("local_epochs", 0)
    text = (f"Data <code>{_e(data.get('root', 'n/a'))}</code> ({_e(data.get('layout', 'n/a'))}, "
            f"{data.get('num_images', 'n/a')} images, classes {_e(', '.join(data.get('class_names', [])))}); "
            f"train/val/test = {split.get('train', '?')}/{split.get('val', '?')}/{split.get('test', '?')} images. "
            f"{cfg.get('sites', '?')} sites, partition <code>{_e(cfg.get('partition', '?'))}</code>, model "
            f"<code>{_e(cfg.get('model', '?'))}</code>, {cfg.get('rounds', '?')} rounds × "
            f"{cfg.get('local_epochs', '?')} local epoch(s); centralized and local-only train {epochs} epochs "
            f"(equal sample passes). {runs}. Wall time {results.get('seconds', 0):.0f} s.")
    return f'<p class="lead">{text}</p>'


def _reference(results: dict, key: str = "accuracy"):
    return results["methods"].get("centralized", {}).get("final", {}).get(key)


def _gap_cell(value, reference) -> str:
    """Plain: whether a gap is more than chance is the paired table's to say (coloured there)."""
    if value is None or reference is None:
        return "<td>n/a</td>"
    return f"<td>{100 * (value - reference):+.1f}</td>"


def _method_section(results: dict) -> str:
    """One seed: every method on the global test set, each metric with its bootstrap interval."""
    methods = {n: m for n, m in results["methods"].items() if "final" in m}
    if not methods:
        return ""
    keys = [k for k in TABLE_METRICS if any(m["final"].get(k) is not None for m in methods.values())]
    reference = _reference(results)
    rows = []
    for name, method in methods.items():
        final, ci = method["final"], method.get("final_ci") or {}
        accuracy = final.get("accuracy")
        rows.append([name, *(_cell(final.get(k), ci.get(k)) for k in keys), _bar(accuracy, ci.get("accuracy")),
                     _gap_cell(accuracy, reference), f"<td>{method.get('sample_passes', 0):,}</td>"])
    headers = ["Method", *(METRICS[k] for k in keys), "Accuracy, 0–100 %", "Δ accuracy vs centralized, pp",
               "Sample passes"]
    note = _bootstrap_note(methods)
    return "<h2>Global test set (macro averages, %)</h2>\n" + _table(headers, rows) + note


def _bootstrap_note(methods: dict) -> str:
    about = next((m["bootstrap"] for m in methods.values() if m.get("bootstrap")), None)
    if about:
        return (f'<p class="note">Under each value: its 95 % interval ({_e(about.get("method", "bootstrap"))}, '
                f'{_e(about.get("resamples", "?"))} resamples of {_e(about.get("unit", "image"))}s); the bar shows '
                "accuracy (tick) and its interval (shaded) on a 0–100 % scale.</p>")
    if any(m.get("final_ci") for m in methods.values()):
        return '<p class="note">Under each value: its 95 % bootstrap interval over the test set.</p>'
    return '<p class="note">No intervals in this run\'s results.json.</p>'


def _seeds_section(results: dict) -> str:
    """Several seeds: mean ± sd and the t-interval over seeds, per method and metric."""
    rows_in = [(n, m["across_seeds"]) for n, m in results["methods"].items() if m.get("across_seeds")]
    if not rows_in:
        return ""
    keys = [k for k in (*TABLE_METRICS, "auc", "sensitivity", "specificity") if any(k in s for _, s in rows_in)]
    rows = []
    for name, stats in rows_in:
        cells = []
        for key in keys:
            row = stats.get(key) or {}
            sd = "" if row.get("sd") is None else f" ± {100 * row['sd']:.1f}"
            values = ", ".join(_pct(v) for v in row.get("values", []))
            seeds = f'<br><span class="ci">seeds: {values}</span>' if values else ""
            cells.append(f"<td>{_pct(row.get('mean'))}{sd}{_interval(row.get('ci'))}{seeds}</td>")
        accuracy = stats.get("accuracy") or {}
        rows.append([name, *cells, _bar(accuracy.get("mean"), accuracy.get("ci"))])
    n = len(results.get("seeds") or rows_in[0][1].get("accuracy", {}).get("values", []))
    return (f"<h2>Across {n} seeds: mean ± sd, 95% t-interval (%)</h2>\n"
            + _table(["Method", *(METRICS[k] for k in keys), "Accuracy, 0–100 %"], rows))


def _paired_section(results: dict) -> str:
    """Each method minus centralized on the same test images: difference, interval and p."""
    parts = []
    for field, title in (("paired_vs_centralized", "Paired difference to centralized (same test images)"),
                         ("patient_paired_vs_centralized", "Paired difference to centralized, per patient")):
        found = [(n, m[field]) for n, m in results["methods"].items() if m.get(field)]
        if not found:
            continue
        keys = [k for k in METRICS if any(k in p for _, p in found)]
        rows = [[name, *(_diff_cell(paired.get(k)) for k in keys)] for name, paired in found]
        test = next((p[k].get("test") for _, p in found for k in keys if p.get(k) and p[k].get("test")), "bootstrap")
        parts.append(f"<h2>{_e(title)}: Δ pp, 95% CI, p ({_e(test)})</h2>\n"
                     + _table(["Method", *(METRICS[k] for k in keys)], rows))
    return "\n".join(parts)


def _diff_cell(row: dict | None) -> str:
    if not row or row.get("diff") is None:
        return "<td>n/a</td>"
    ci, p = row.get("ci"), row.get("p")
    span = "" if not ci or None in ci else f'<br><span class="ci">{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}</span>'
    pval = "" if p is None else f'<br><span class="ci">p {"&lt;0.001" if p < 0.001 else f"{p:.3f}"}</span>'
    kind = "" if not ci or None in ci or ci[0] <= 0 <= ci[1] else ("better" if ci[0] > 0 else "worse")
    return f'<td class="{kind}">{100 * row["diff"]:+.1f}{span}{pval}</td>'


def _patient_section(results: dict) -> str:
    found = [(n, m["final"]["patient_level"], m.get("patient_ci") or {}) for n, m in results["methods"].items()
             if m.get("final", {}).get("patient_level")]
    if not found:
        return ""
    keys = [k for k in PATIENT_METRICS if any(p.get(k) is not None for _, p, _ in found)]
    rows = [[name, f"<td>{p.get('num_patients', 'n/a')}</td>", *(_cell(p.get(k), ci.get(k)) for k in keys)]
            for name, p, ci in found]
    return ("<h2>Per patient (mean cell probability, %)</h2>\n"
            + _table(["Method", "Patients", *(METRICS[k] for k in keys)], rows))


def _cross_site_section(results: dict) -> str:
    methods = {n: m["cross_site"] for n, m in results["methods"].items() if m.get("cross_site")}
    if not methods:
        return ""
    sets = list(next(iter(methods.values())))
    rows = [[name, *(_cell(scores.get(s)) for s in sets)] for name, scores in methods.items()]
    return ("<h2>Cross-site: every final model on every site's local test split (accuracy, %)</h2>\n"
            + _table(["Model \\ test set", *sets], rows))


def _partition_section(results: dict) -> str:
    sites, classes = results.get("partition"), results.get("data", {}).get("class_names", [])
    if not sites:
        return ""
    rows = [[site["site"], *(f"<td>{site['train'].get(c, 0)}</td>" for c in classes),
             *(f"<td>{sum(site[side].values())}</td>" for side in ("train", "val", "test"))] for site in sites]
    return ("<h2>Partition (training images per class)</h2>\n"
            + _table(["Site", *classes, "train", "val", "test"], rows))


def _plots_section(out: Path) -> str:
    """Every PNG beside the report, inlined as a data: URI (the page needs no other file)."""
    found = sorted(out.glob("*.png"), key=lambda p: (p.name not in PLOT_ORDER, PLOT_ORDER.index(p.name)
                                                       if p.name in PLOT_ORDER else 0, p.name))
    if not found:
        return ""
    figures = []
    for path in found:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{_e(path.stem)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_e(path.name)}</figcaption></figure>")
    return "<h2>Plots</h2>\n" + "\n".join(figures)
