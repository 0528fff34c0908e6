/* The coordinator's dashboard: polls /api/live every 2 s, the runs and the exported model every 10 s. */
"use strict";
(() => {
  const {el, put, table, facts, num, bytes, seconds, when, ago} = Leuk;

  function renderRun(data) {
    const s = data.status || {}, rounds = data.rounds || [];
    put("state-dir", data.state_dir || "");
    const total = s.total_rounds || "?";
    const done = rounds.length ? rounds[rounds.length - 1].round : 0;
    const current = s.phase === "finished" ? `finished: ${done} of ${total} rounds`
      : s.round ? `round ${s.round} of ${total}` : "not started";
    const last = rounds[rounds.length - 1];
    const sent = rounds.reduce((n, r) => n + (r.bytes_sent || 0), 0);
    const received = rounds.reduce((n, r) => n + (r.bytes_received || 0), 0);
    put("run",
        el("p", {}, el("span", {id: "round", class: "big"}, current), "  ",
           el("span", {id: "phase", class: "badge"}, s.phase || "waiting for the coordinator")),
        facts([["run", s.run_id || "–"], ["phase for", typeof s.phase_started === "number" ? seconds(data.now - s.phase_started) : "–"],
               ["rounds completed", `${done} of ${total}`],
               ["sent", bytes(sent)], ["received", bytes(received)],
               last && ["last round", `${seconds(last.seconds)}, ${last.sites_replied} of ${last.sites_sampled} sites replied`]]));
    if (!last) { put("time-split", el("p", {class: "muted"}, "no round completed yet")); return; }
    const parts = (split) => ["training", "transfer", "aggregation", "evaluation", "other"].map((name) => ({name, value: split[name] || 0}));
    const sum = {};
    rounds.forEach((r) => Object.entries(r.split).forEach(([k, v]) => { sum[k] = (sum[k] || 0) + v; }));
    put("time-split", el("h3", {}, `Time in round ${last.round}`), Leuk.splitBar(parts(last.split)),
        el("h3", {}, `Time in all ${rounds.length} rounds`), Leuk.splitBar(parts(sum)));
  }

  function renderSites(data) {
    const reason = (x) => (x ? `round ${x.round}: ${x.reason}` : "");
    put("sites", table([
      {label: "site", value: (r) => el("strong", {}, r.name)},
      {label: "node", value: (r) => el("span", {class: "mono muted"}, r.node)},
      {label: "last seen", value: (r) => ago(r.last_seen, data.now)},
      {label: "rounds joined", cls: "num", value: (r) => r.rounds_joined},
      {label: "accuracy", cls: "num", value: (r) => num(r.accuracy)},
      {label: "DP epsilon", cls: "num", value: (r) => num(r.dp_epsilon, 3)},
      {label: "rejected updates", cls: "num", value: (r) => el("span", {class: r.rejected ? "bad" : ""}, r.rejected)},
      {label: "last rejection", value: (r) => el("span", {class: "bad site-rejection"}, reason(r.last_rejected))},
      {label: "failures", cls: "num", value: (r) => el("span", {class: r.failures ? "warn" : ""}, r.failures)},
      {label: "last failure", value: (r) => el("span", {class: "warn"}, reason(r.last_failures))},
    ], data.sites, "no site registered or seen yet"));
    const events = (data.rounds || []).flatMap((r) => [
      ...r.rejected.map((e) => ({round: r.round, site: e.site, what: "update rejected", reason: e.reason, cls: "bad"})),
      ...r.failures.map((e) => ({round: r.round, site: e.site, what: `failed in ${e.phase}`, reason: e.reason, cls: "warn"}))]);
    put("events", table([
      {label: "round", cls: "num", value: (e) => e.round},
      {label: "site", value: (e) => e.site},
      {label: "what", value: (e) => el("span", {class: e.cls}, e.what)},
      {label: "reason", value: (e) => el("span", {class: "reason"}, e.reason)},
    ], events.slice(-50).reverse(), "none: every reply was accepted"));
  }

  function renderCurves(data) {
    const c = data.curves || {};
    put("chart-accuracy", Leuk.lineChart(c.accuracy || [], {yLabel: "accuracy", yMin: 0, yMax: 1}));
    put("chart-loss", Leuk.lineChart(c.loss || [], {yLabel: "loss"}));
    put("rounds", table([
      {label: "round", cls: "num", value: (r) => r.round},
      {label: "ended", value: (r) => when(r.time)},
      {label: "sites replied", cls: "num", value: (r) => `${r.sites_replied} of ${r.sites_sampled}`},
      {label: "time", cls: "num", value: (r) => seconds(r.seconds)},
      {label: "sent", cls: "num", value: (r) => bytes(r.bytes_sent)},
      {label: "received", cls: "num", value: (r) => bytes(r.bytes_received)},
      {label: "site epsilon (max)", cls: "num", value: (r) => num(r.privacy.max_epsilon, 3)},
    ], (data.rounds || []).slice().reverse(), "no round completed yet"));
  }

  function renderRuns(runs) {
    put("runs", table([
      {label: "folder", value: (r) => el("span", {class: "mono"}, r.name)},
      {label: "model", value: (r) => r.model || "–"},
      {label: "rounds", cls: "num", value: (r) => r.rounds},
      {label: "last round", value: (r) => when(r.last_round_time)},
      {label: "exported", value: (r) => (r.finished ? "yes" : "no")},
      {label: "model card", value: (r) => (r.model_card ? "yes" : "no")},
      {label: "metrics", value: (r) => Object.entries(r.metrics).filter(([k]) => !k.includes("seconds")).slice(0, 4)
        .map(([k, v]) => `${k} ${num(v)}`).join(", ")},
    ], runs, "no run yet"));
  }

  function renderModel(m) {
    const card = document.getElementById("model-card");
    if (!m.exported) {
      put("model", el("p", {class: "muted"}, "not exported yet: the run exports its model after the last round"));
      card.hidden = true;
      return;
    }
    const d = m.description || {};
    const metrics = Object.entries(m.metrics || {}).filter(([k, v]) => typeof v === "number" && !k.includes("seconds"));
    put("model", facts([["model", d.model || d.name || "–"], ["classes", (d.class_names || []).join(", ") || "–"],
                        ["weights", bytes(m.weights_bytes)], ...metrics.slice(0, 6).map(([k, v]) => [k, num(v)])]),
        m.model_card ? el("h3", {}, "MODEL_CARD.md") : el("p", {class: "muted"}, "no MODEL_CARD.md in this folder"));
    card.hidden = !m.model_card;
    card.textContent = m.model_card || "";
  }

  Leuk.poll("/api/live", 2000, (data) => { renderRun(data); renderSites(data); renderCurves(data); });
  Leuk.poll("/api/runs", 10000, renderRuns);
  Leuk.poll("/api/model", 10000, renderModel);
})();
