"""The comparison report: a papers-style table (Markdown), the cross-site table and plots."""
from __future__ import annotations

from pathlib import Path

from leukfed.common.atomic import atomic_write_text
from leukfed.simulations.html_report import write_html_report

COLUMNS = ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "auc_ovr")
HEADERS = ("Accuracy", "Precision", "Recall/Sensitivity", "Specificity", "F1", "AUC")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _gap(value, reference) -> str:
    if value is None or reference is None:
        return "n/a"
    return f"{100 * (value - reference):+.2f}"


def method_table(results: dict) -> str:
    """One row per method on the global test set, with the accuracy gap to centralized in points."""
    methods = results["methods"]
    reference = methods.get("centralized", {}).get("final", {}).get("accuracy")
    lines = ["| Method | " + " | ".join(HEADERS) + " | Δ accuracy vs centralized (pp) | Sample passes |",
             "|---" * (len(HEADERS) + 3) + "|"]
    for name, method in methods.items():
        final = method["final"]
        cells = [_pct(final.get(c)) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_gap(final.get('accuracy'), reference)} | "
                     f"{method['sample_passes']:,} |")
    return "\n".join(lines)


def patient_table(results: dict) -> str | None:
    rows = [(n, m["final"].get("patient_level")) for n, m in results["methods"].items()]
    if not any(p for _, p in rows):
        return None
    reference = (results["methods"].get("centralized", {}).get("final", {}).get("patient_level") or {}).get("auc")
    lines = ["| Method | Patients | Patient AUC | Sensitivity | Specificity | Accuracy | Δ AUC vs centralized (pp) |",
             "|---|---|---|---|---|---|---|"]
    for name, p in rows:
        if p:
            lines.append(f"| {name} | {p['num_patients']} | {_pct(p.get('auc', p.get('auc_ovr')))} | "
                         f"{_pct(p.get('sensitivity', p.get('macro_sensitivity')))} | "
                         f"{_pct(p.get('specificity', p.get('macro_specificity')))} | {_pct(p['accuracy'])} | "
                         f"{_gap(p.get('auc', p.get('auc_ovr')), reference)} |")
    return "\n".join(lines)


def cross_site_table(results: dict) -> str:
    """Every final model scored on every site's local test split (accuracy, %)."""
    methods = results["methods"]
    sets = list(next(iter(methods.values()))["cross_site"])
    lines = ["| Model \\ test set | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name, method in methods.items():
        lines.append(f"| {name} | " + " | ".join(_pct(method["cross_site"].get(s)) for s in sets) + " |")
    return "\n".join(lines)


def partition_table(results: dict) -> str:
    classes = results["data"]["class_names"]
    lines = ["| Site | " + " | ".join(classes) + " | train | val | test |", "|---" * (len(classes) + 4) + "|"]
    for site in results["partition"]:
        train = site["train"]
        lines.append(f"| {site['site']} | " + " | ".join(str(train[c]) for c in classes)
                     + f" | {sum(train.values())} | {sum(site['val'].values())} | {sum(site['test'].values())} |")
    return "\n".join(lines)


def write_plots(out: Path, results: dict) -> None:
    from leukfed.common.plots import plot_confusion_matrix, plot_curves

    series = {}
    for name, method in results["methods"].items():
        points = [(row["round"], row["server_evaluate"]["accuracy"]) for row in method["history"]
                  if isinstance(row, dict) and "round" in row and row.get("server_evaluate")]
        if points:
            series[name] = points
    hlines = {}
    if "centralized" in results["methods"]:
        hlines["centralized (equal compute)"] = results["methods"]["centralized"]["final"]["accuracy"]
    local = [m["final"]["accuracy"] for n, m in results["methods"].items() if n.startswith("local-")]
    if local:
        hlines["local-only (mean of sites)"] = sum(local) / len(local)
    if series:
        plot_curves(series, out / "accuracy_per_round.png", xlabel="round", ylabel="global test accuracy",
                    title="federated accuracy per round", hlines=hlines)
    for name, method in results["methods"].items():
        final = method["final"]
        plot_confusion_matrix(final["confusion_matrix"], final["class_names"], out / f"confusion_{name}.png",
                              title=f"{name} (global test)")


def write_report(out: Path, results: dict) -> None:
    cfg = results["config"]
    data = results["data"]
    patient = patient_table(results)
    parts = [
        "# Federated vs centralized vs local-only",
        "",
        f"Data: `{data['root']}` ({data['layout']}, {data['num_images']} images, classes {', '.join(data['class_names'])}); "
        f"split train/val/test = {data['split']['train']}/{data['split']['val']}/{data['split']['test']}. "
        f"{cfg['sites']} sites, partition `{cfg['partition']}`, model `{cfg['model']}` "
        f"(image size {cfg['image_size'] or 'default'}, pretrained {cfg['pretrained']}), {cfg['rounds']} rounds x "
        f"{cfg['local_epochs']} local epoch(s); baselines trained for {cfg['rounds'] * cfg['local_epochs']} epochs "
        "(equal sample passes). Seed {}. Wall time {:.0f} s.".format(cfg["seed"], results["seconds"]),
        "",
        "## Global test set (macro averages, %)",
        "",
        method_table(results),
        "",
    ]
    if patient:
        parts += ["## Per patient (mean cell probability, %)", "", patient, ""]
    parts += ["## Cross-site: every final model on every site's local test split (accuracy, %)", "",
              cross_site_table(results), "", "## Partition (training images per class)", "", partition_table(results), "",
              "Plots: `accuracy_per_round.png`, `label_distribution.png`, `confusion_<method>.png`.", ""]
    atomic_write_text(out / "report.md", "\n".join(parts))
    write_plots(out, results)
    write_html_report(out, results)
