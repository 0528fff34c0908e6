/* The hospital console: every section polls its own document (read-only). */
"use strict";
(() => {
  const {el, put, table, facts, num, bytes, when} = Leuk;
  const short = (digest) => (digest ? el("span", {class: "mono", title: digest}, `${String(digest).slice(0, 16)}…`) : "–");
  const changeText = (c) => ["changed", "added", "removed"].filter((k) => c[k] && c[k].length)
    .map((k) => `${k}: ${c[k].join(", ")}`).join("; ");

  function renderOverview(o) {
    put("site", `site ${o.site} · data ${o.data} · state ${o.state}`);
  }

  function renderApprovals(a) {
    const inst = a.installed;
    if (!inst) {
      put("installed", el("p", {class: "bad"}, `no approval recorded in ${a.file}: the site refuses every task`));
    } else {
      const drift = [changeText(inst.changes), inst.hook_changes && changeText(inst.hook_changes) && `start-up hooks ${changeText(inst.hook_changes)}`]
        .filter((x) => x).join("; ");
      put("installed", el("p", {},
        el("span", {id: "installed-status", class: `badge ${inst.matches ? "ok" : "bad"}`},
           inst.matches ? "installed code matches the approval in force" : "installed code differs from the approval"),
        " ", el("span", {class: "muted"}, `installed digest ${inst.installed_digest}`),
        drift ? el("div", {class: "bad"}, `changed since the approval: ${drift}`) : null));
    }
    put("approvals", table([
      {label: "approved", value: (e) => when(e.time)},
      {label: "by", value: (e) => el("strong", {class: "reviewer"}, e.reviewer)},
      {label: "note", value: (e) => e.note || ""},
      {label: "code", value: (e) => `leukfed ${e.leukfed_version}, ${e.files} files, ${e.startup_hooks} start-up hooks`},
      {label: "code digest", value: (e) => el("span", {class: "mono code-digest"}, e.code_digest)},
      {label: "app bundle", value: (e) => [short(e.fab_digest), e.approved_fabs.length ? ` + ${e.approved_fabs.length} approved bundles` : ""]},
      {label: "runtime", value: (e) => `python ${e.python}, flwr ${e.flwr}`},
      {label: "changed since the previous approval", value: (e) => (e.changes_since_previous === null ? "first approval"
        : (changeText(e.changes_since_previous) || "no file changed") + (e.changes_since_previous.hooks ? `; hooks ${e.changes_since_previous.hooks}` : ""))},
    ], a.approvals, "no approval recorded"));
  }

  function renderAudit(a) {
    if (!a.exists) {
      put("audit-status", el("p", {class: "muted"}, `no task recorded yet (${a.file})`));
      put("audit");
      return;
    }
    put("audit-status", el("p", {},
      el("span", {id: "audit-verdict", class: `badge ${a.verified ? "ok" : "bad"}`}, a.verified ? "verified" : "BROKEN"), " ",
      el("span", {}, a.verified ? `${a.count} entries, hash chain intact; head ${a.head}` : a.summary)));
    put("audit", table([
      {label: "#", cls: "num", value: (e) => e.seq},
      {label: "time", value: (e) => e.time},
      {label: "run", value: (e) => el("span", {class: "mono"}, e.run_id)},
      {label: "round", cls: "num", value: (e) => (e.round === null || e.round === undefined ? "" : e.round)},
      {label: "task", value: (e) => e.message},
      {label: "outcome", value: (e) => el("span", {class: e.outcome === "answered" ? "ok" : "bad"}, e.outcome)},
      {label: "received", cls: "num", value: (e) => bytes(e.bytes_in)},
      {label: "sent", cls: "num", value: (e) => bytes(e.bytes_out)},
      {label: "update sent (sha256)", value: (e) => short(typeof e.update_sha256 === "string" ? e.update_sha256 : null)},
      {label: "metrics sent", value: (e) => (e.metrics_sent || []).join(", ")},
      {label: "reason sent", value: (e) => e.reason_sent || ""},
    ], a.entries, "no entries"));
  }

  function renderPolicy(p) {
    put("policy", el("p", {class: "muted"}, p.in_force ? `from ${p.file}` : "no policy file yet: the defaults below apply"),
        table([
          {label: "setting", value: (s) => el("span", {class: "mono"}, s.name)},
          {label: "value", value: (s) => el("strong", {class: "policy-value", "data-setting": s.name}, s.value === "" ? "any" : String(s.value))},
          {label: "what it means", value: (s) => el("span", {class: "muted"}, s.help)},
        ], p.settings));
  }

  function renderPrivacy(p) {
    const limit = p.budget ? `${num(p.budget, 3)}` : "none set (--dp-budget)";
    const parts = [facts([["epsilon spent", num(p.epsilon_spent, 3), p.fraction > 0.9 ? "bad" : ""], ["limit", limit],
                          ["delta", String(p.delta)], ["rounds accounted", p.entries], ["runs", Object.keys(p.runs).length]])];
    if (p.budget) {
      const spent = Math.min(p.epsilon_spent, p.budget);
      parts.push(Leuk.splitBar([{name: "epsilon spent", value: spent}, {name: "left", value: p.budget - spent}], (x) => num(x, 3)));
    }
    if (!p.entries) parts.push(el("p", {class: "muted"}, "no DP training on this site's data recorded yet"));
    put("privacy", parts);
  }

  function renderData(d) {
    put("data", el("p", {}, el("span", {id: "data-verdict", class: `badge ${d.ok ? "ok" : "bad"}`}, d.ok ? "usable" : "not usable"),
                   " ", `${d.num_images} images in ${d.num_classes} classes (${d.layout}) at ${d.root}`),
        facts([["image sizes", Object.entries(d.image_sizes || {}).map(([k, v]) => `${k} × ${v}`).join(", ")],
               ["unreadable", (d.unreadable || []).length], ["duplicate files", d.duplicate_files],
               ["patients", d.num_patients === null ? "no patient ids" : d.num_patients]]),
        table([{label: "class", value: (r) => r[0]}, {label: "images", cls: "num", value: (r) => r[1]}],
              Object.entries(d.classes || {})),
        (d.problems || []).length ? el("ul", {class: "warn"}, d.problems.map((p) => el("li", {}, p))) : null);
  }

  Leuk.poll("/api/overview", 0, renderOverview);
  Leuk.poll("/api/approvals", 10000, renderApprovals);
  Leuk.poll("/api/audit", 3000, renderAudit);
  Leuk.poll("/api/policy", 10000, renderPolicy);
  Leuk.poll("/api/privacy", 5000, renderPrivacy);
  Leuk.poll("/api/data", 0, renderData);
})();
