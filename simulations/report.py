"""The comparison report: a papers-style table (Markdown), the cross-site table and plots.

results.json, one seed (OUT/results.json, or OUT/seed-K/results.json of a multi-seed run):
  config, data {root, layout, class_names, num_images, has_patients, split}, partition, seconds,
  methods[name] (name: federated-<strategy>, centralized, local-site-<i>):
    final: classification_metrics on the global test set (+ final["patient_level"]: patient_metrics)
    cross_site {test set: accuracy}, cross_site_patient_auc, sample_passes, seconds, history,
    run_dir: the final model, a run directory for `leuk evaluate --model`
    final_ci {metric: [lo, hi]}: bootstrap 95 % interval, image level (resampling whole patients when
      the data names them, else images); patient_ci likewise for final["patient_level"] (patients)
    paired_vs_centralized {metric: {"diff": d, "ci": [lo, hi], "p": p}}: this method minus centralized
      on the same test images (paired bootstrap, two-sided p); patient_paired_vs_centralized likewise
      per patient; both absent for centralized itself
    bootstrap {unit, resamples, seed, level, method}
  `metric` is a key of `final`: accuracy, balanced_accuracy, and with 2 classes auc, sensitivity,
  specificity (of class 1), else auc_ovr, macro_sensitivity, macro_specificity (common/stats.py
  headline_keys). An interval is null where no resample defines it; the *_ci keys are absent with
  --bootstrap 0. Raw predictions: OUT/predictions/<method>/<test set>.npz (common/stats.py).

results.json, several seeds (OUT/results.json of `--seeds 0,1,2`):
  config, seeds [..], split_seed, data, seconds, per_seed {seed: "seed-K/results.json"},
  methods[name]:
    across_seeds {metric: {"mean": m, "sd": s, "ci": [lo, hi], "values": [one per seed], "n": n}}
      (95 % t-interval over seeds); patient_across_seeds likewise (when patients are known)
    paired_vs_centralized {metric: {"diff": mean difference, "ci": [lo, hi], "p": p, "test": "paired t",
      "n": seeds, "per_seed": [{"seed", "diff", "ci", "p"}: that seed's paired bootstrap]}}
      (scipy.stats.ttest_rel over seeds); patient_paired_vs_centralized likewise
    run_dirs {seed: run directory}, sample_passes, seconds (all seeds)
"""
from __future__ import annotations

from pathlib import Path

from leukfed.common.atomic import atomic_write_text
from leukfed.simulations.html_report import write_html_report

COLUMNS = ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "auc_ovr")
HEADERS = ("Accuracy", "Precision", "Recall/Sensitivity", "Specificity", "F1", "AUC")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _with_ci(value, ci) -> str:
    """"97.20 (93.1–99.4)": a value with its 95 % interval, in percent."""
    if value is None or not ci:
        return _pct(value)
    return f"{_pct(value)} ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})"


def _p(value) -> str:
    return "n/a" if value is None else ("<0.001" if value < 0.001 else f"{value:.3f}")


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
        final, ci = method["final"], method.get("final_ci", {})
        cells = [_with_ci(final.get(c), ci.get(c)) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_gap(final.get('accuracy'), reference)} | "
                     f"{method['sample_passes']:,} |")
    return "\n".join(lines)


def patient_table(results: dict) -> str | None:
    rows = [(n, m["final"].get("patient_level"), m.get("patient_ci", {})) for n, m in results["methods"].items()]
    if not any(p for _, p, _ in rows):
        return None
    reference = (results["methods"].get("centralized", {}).get("final", {}).get("patient_level") or {}).get("auc")
    lines = ["| Method | Patients | Patient AUC | Sensitivity | Specificity | Accuracy | Δ AUC vs centralized (pp) |",
             "|---|---|---|---|---|---|---|"]
    for name, p, ci in rows:
        if p:
            def cell(key: str, fallback: str) -> str:
                found = key if key in p else fallback
                return _with_ci(p.get(found), ci.get(found))

            lines.append(f"| {name} | {p['num_patients']} | {cell('auc', 'auc_ovr')} | "
                         f"{cell('sensitivity', 'macro_sensitivity')} | "
                         f"{cell('specificity', 'macro_specificity')} | {cell('accuracy', 'accuracy')} | "
                         f"{_gap(p.get('auc', p.get('auc_ovr')), reference)} |")
    return "\n".join(lines)


def _metric_keys(results: dict) -> list[str]:
    from leukfed.common.stats import headline_keys

    return list(headline_keys(results["data"]["class_names"]))


def paired_table(results: dict, field: str = "paired_vs_centralized") -> str | None:
    """Each method minus centralized on the same test set: difference in points, 95 % CI, p."""
    rows = [(n, m[field]) for n, m in results["methods"].items() if m.get(field)]
    if not rows:
        return None
    keys = _metric_keys(results)
    lines = ["| Method | " + " | ".join(f"{k} Δ pp (95% CI), p" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, paired in rows:
        cells = [f"{_gap(paired[k]['diff'], 0)} ({_span(paired[k]['ci'])}), p {_p(paired[k]['p'])}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _span(ci) -> str:
    return "n/a" if not ci else f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"


def seeds_table(results: dict, field: str = "across_seeds") -> str | None:
    """Per method and metric over seeds: mean ± sd (95 % t-interval), in percent."""
    rows = [(n, m[field]) for n, m in results["methods"].items() if m.get(field)]
    if not rows:
        return None
    keys = _metric_keys(results)
    lines = ["| Method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, stats in rows:
        cells = []
        for key in keys:
            row = stats[key]
            sd = "" if row["sd"] is None else f" ± {100 * row['sd']:.2f}"
            ci = "" if not row["ci"] else f" ({100 * row['ci'][0]:.1f}–{100 * row['ci'][1]:.1f})"
            cells.append(f"{_pct(row['mean'])}{sd}{ci}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_paired_table(results: dict, field: str = "paired_vs_centralized") -> str | None:
    """Method minus centralized over seeds: mean difference, its t-interval, the paired t p, and each
    seed's paired-bootstrap p."""
    rows = [(n, m[field]) for n, m in results["methods"].items() if m.get(field)]
    if not rows:
        return None
    lines = ["| Method | Metric | Mean Δ (pp) | 95% CI (pp) | paired t p | per-seed bootstrap p |", "|---|---|---|---|---|---|"]
    for name, paired in rows:
        for key in _metric_keys(results):
            row = paired[key]
            per_seed = ", ".join(f"{r['seed']}: {_p(r.get('p'))}" for r in row["per_seed"])
            lines.append(f"| {name} | {key} | {_gap(row['diff'], 0)} | {_span(row['ci'])} | {_p(row['p'])} | {per_seed} |")
    return "\n".join(lines)


def write_seeds_report(out: Path, results: dict) -> None:
    """OUT/report.md and report.html of a multi-seed run: spread across seeds and paired differences to
    centralized."""
    cfg, data, seeds = results["config"], results["data"], results["seeds"]
    origin = "from --split" if cfg["split"] else f"split seed {results['split_seed']}"
    parts = [
        "# Federated vs centralized vs local-only, over seeds",
        "",
        f"Seeds {', '.join(map(str, seeds))}: each seed draws its own partition, initialisation and data order; "
        f"every seed scores every method on the same test split ({data['split']['test']} images"
        f", {origin}). Data: `{data['root']}` "
        f"({data['num_images']} images, classes {', '.join(data['class_names'])}); {cfg['sites']} sites, partition "
        f"`{cfg['partition']}`, model `{cfg['model']}`, {cfg['rounds']} rounds x {cfg['local_epochs']} local epoch(s). "
        f"Wall time {results['seconds']:.0f} s. Per seed: `seed-K/report.md` (bootstrap intervals).",
        "",
        "## Across seeds: mean ± sd (95% t-interval), %",
        "",
        seeds_table(results) or "",
        "",
    ]
    sections = [("## Per patient, across seeds: mean ± sd (95% t-interval), %", seeds_table(results, "patient_across_seeds")),
                ("## Paired difference to centralized (same test images): paired t over seeds",
                 seeds_paired_table(results)),
                ("## Paired difference to centralized, per patient: paired t over seeds",
                 seeds_paired_table(results, "patient_paired_vs_centralized"))]
    for title, table in sections:
        if table:
            parts += [title, "", table, ""]
    atomic_write_text(out / "report.md", "\n".join(parts))
    write_html_report(out, results)


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
    paired, paired_patient = paired_table(results), paired_table(results, "patient_paired_vs_centralized")
    if paired:
        parts += ["## Paired difference to centralized (same test images; paired bootstrap)", "", paired, ""]
    if paired_patient:
        parts += ["## Paired difference to centralized, per patient (paired bootstrap over patients)", "",
                  paired_patient, ""]
    if results["methods"] and "bootstrap" in next(iter(results["methods"].values())):
        about = next(iter(results["methods"].values()))["bootstrap"]
        parts += [f"Intervals: 95 % {about['method']} ({about['resamples']} resamples of {about['unit']}s, seed "
                  f"{about['seed']}), in parentheses. Run directories: `runs/<method>/` (`leuk evaluate --model`).", ""]
    parts += ["## Cross-site: every final model on every site's local test split (accuracy, %)", "",
              cross_site_table(results), "", "## Partition (training images per class)", "", partition_table(results), "",
              "Plots: `accuracy_per_round.png`, `label_distribution.png`, `confusion_<method>.png`.", ""]
    atomic_write_text(out / "report.md", "\n".join(parts))
    write_plots(out, results)
    write_html_report(out, results)
