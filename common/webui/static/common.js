/* leukfed pages: DOM helpers (text only, never HTML), polling, formats and SVG charts. No dependencies. */
"use strict";
const Leuk = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

  /* el("td", {class: "num", title: "..."}, "text", otherNode): children are text or nodes, never markup. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children.flat()) {
      if (child !== undefined && child !== null) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function put(id, ...nodes) {
    const target = document.getElementById(id);
    if (target) target.replaceChildren(...nodes.flat());
  }

  function table(columns, rows, empty) {
    if (!rows.length) return el("p", {class: "muted"}, empty || "none");
    const head = el("tr", {}, columns.map((c) => el("th", {}, c.label)));
    const body = rows.map((row) => el("tr", {}, columns.map((c) => el("td", {class: c.cls}, c.value(row)))));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
  }

  function facts(pairs) {
    return el("div", {class: "facts"}, pairs.filter((p) => p).map(([label, value, cls]) =>
      el("div", {}, el("span", {}, label), el("span", {class: cls}, value))));
  }

  const num = (x, digits) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits === undefined ? 4 : digits) : "–");
  function bytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function seconds(s) {
    if (typeof s !== "number") return "–";
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }
  const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleString() : (t || "–"));
  const ago = (t, now) => (typeof t === "number" ? `${seconds(Math.max(0, now - t))} ago` : "never");

  /* Fetch `url` now and every `everyMs`; render(data); the #updated element shows the last success. */
  function poll(url, everyMs, render) {
    const status = document.getElementById("updated");
    async function tick() {
      try {
        const response = await fetch(url, {cache: "no-store", credentials: "same-origin"});
        const data = await response.json();
        if (!response.ok) throw new Error(data.error || response.statusText);
        render(data);
        if (status) { status.textContent = `updated ${new Date().toLocaleTimeString()}`; status.className = "muted"; }
      } catch (err) {
        if (status) { status.textContent = `not updated: ${err.message}`; status.className = "bad"; }
      }
      if (everyMs) setTimeout(tick, everyMs);
    }
    tick();
  }

  function ticks(lo, hi, count) {
    const step = (hi - lo) / count;
    return Array.from({length: count + 1}, (_, i) => lo + i * step);
  }

  /* Line chart of series [{name, points: [[x, y], ...]}] as SVG, with a legend below it. */
  function lineChart(series, opts) {
    const o = Object.assign({width: 560, height: 260, xLabel: "round", yLabel: ""}, opts || {});
    const all = series.flatMap((s) => s.points);
    if (!all.length) return el("p", {class: "muted"}, "no points yet");
    const pad = {l: 52, r: 12, t: 10, b: 36};
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
    let y0 = o.yMin !== undefined ? o.yMin : Math.min(...ys), y1 = o.yMax !== undefined ? o.yMax : Math.max(...ys);
    if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
    const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (o.width - pad.l - pad.r);
    const Y = (y) => o.height - pad.b - ((y - y0) / (y1 - y0)) * (o.height - pad.t - pad.b);
    const chart = svg("svg", {viewBox: `0 0 ${o.width} ${o.height}`, role: "img", "aria-label": o.yLabel});
    for (const y of ticks(y0, y1, 4)) {
      chart.append(svg("line", {x1: pad.l, x2: o.width - pad.r, y1: Y(y), y2: Y(y), stroke: "#e4e7ec"}),
                   svg("text", {x: pad.l - 6, y: Y(y) + 4, "text-anchor": "end"}, num(y, 3)));
    }
    const xTicks = [...new Set(xs)].sort((a, b) => a - b);
    const every = Math.ceil(xTicks.length / 10);
    xTicks.filter((_, i) => i % every === 0).forEach((x) =>
      chart.append(svg("text", {x: X(x), y: o.height - pad.b + 16, "text-anchor": "middle"}, x)));
    chart.append(svg("text", {x: (o.width + pad.l) / 2, y: o.height - 4, "text-anchor": "middle"}, o.xLabel),
                 svg("line", {x1: pad.l, x2: pad.l, y1: pad.t, y2: o.height - pad.b, stroke: "#9aa4b1"}),
                 svg("line", {x1: pad.l, x2: o.width - pad.r, y1: o.height - pad.b, y2: o.height - pad.b, stroke: "#9aa4b1"}));
    const legend = el("div", {class: "legend"});
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const dash = s.name.startsWith("aggregated") || s.name.startsWith("coordinator") ? "6 3" : "";
      const points = s.points.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
      const group = svg("g", {class: "series", "data-series": s.name});
      group.append(svg("polyline", {points, fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": dash}));
      s.points.forEach((p) => group.append(svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, fill: color},
                                               svg("title", {}, `${s.name}, ${o.xLabel} ${p[0]}: ${num(p[1])}`))));
      chart.append(group);
      const swatch = el("span", {class: "swatch"});
      swatch.style.background = color;   // CSSOM, allowed by the page's CSP (no inline style attribute)
      legend.append(el("span", {}, swatch, s.name));
    });
    return el("div", {class: "chart"}, chart, legend);
  }

  /* One horizontal bar split into named parts [{name, value}]; format(value) labels them (default: seconds). */
  function splitBar(parts, format, width) {
    const show = format || seconds;
    const total = parts.reduce((sum, p) => sum + p.value, 0) || 1;
    const w = width || 560, chart = svg("svg", {viewBox: `0 0 ${w} 18`, preserveAspectRatio: "none"});
    let x = 0;
    parts.forEach((p, i) => {
      const part = (p.value / total) * w;
      chart.append(svg("rect", {x, y: 0, width: Math.max(part, 0), height: 18, fill: COLORS[i % COLORS.length]},
                       svg("title", {}, `${p.name}: ${show(p.value)}`)));
      x += part;
    });
    const legend = el("div", {class: "legend"}, parts.map((p, i) => {
      const swatch = el("span", {class: "swatch"});
      swatch.style.background = COLORS[i % COLORS.length];
      return el("span", {}, swatch, `${p.name} ${show(p.value)}`);
    }));
    return el("div", {class: "split"}, chart, legend);
  }

  return {el, svg, put, table, facts, num, bytes, seconds, when, ago, poll, lineChart, splitBar};
})();
