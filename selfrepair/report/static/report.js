/* selfrepair report page: draws the figures, sorts and filters the tables, and draws the attention row of a
   clicked group. Plain JavaScript, no network. URL fragment (applied on load):
   #sort=TABLE:COLUMN:asc|desc&filter=TABLE:TEXT&drill=TABLE:ROW&at=ELEMENT_ID
   (ROW = the row's position in the table; at= scrolls that element to the top) */
(function () {
  "use strict";
  var SR_COLOR = "#D55E00", NOT_COLOR = "#0072B2", NAN_COLOR = "#999999";
  var MIN_WEIGHT = 0.005, MAX_KEYS = 40;

  function reportError(msg) { if (window.onerror) { window.onerror(msg); } }

  /* ------------------------------------------------------------------ figures */
  function drawFigures() {
    var blocks = document.querySelectorAll("script.fig-json");
    var pending = [];
    blocks.forEach(function (s) {
      var div = document.getElementById(s.getAttribute("data-target"));
      var fig = JSON.parse(s.textContent);
      var p = Plotly.newPlot(div, fig.data || [], fig.layout || {}, { responsive: true, displaylogo: false });
      pending.push(Promise.resolve(p).catch(function (e) { reportError("figure " + div.id + ": " + e); }));
    });
    return Promise.all(pending).then(function () { document.body.setAttribute("data-figures-drawn", String(blocks.length)); });
  }

  /* ------------------------------------------------------------------ tables */
  function cellValue(tr, col, numeric) {
    var td = tr.children[col];
    if (!td) { return null; }
    if (numeric) {
      var v = td.getAttribute("data-v");
      if (v === null || v === "") { return null; }
      var f = parseFloat(v);
      return isNaN(f) ? null : f;
    }
    var t = td.textContent;
    return t === "" ? null : t;
  }

  function sortTable(table, colName, dir) {
    var ths = table.querySelectorAll("thead th");
    var col = -1;
    ths.forEach(function (th, i) { if (th.getAttribute("data-col") === colName) { col = i; } });
    if (col < 0) { reportError("table " + table.id + " has no column " + colName); return; }
    var numeric = ths[col].hasAttribute("data-num");
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var sign = dir === "desc" ? -1 : 1;
    rows.sort(function (a, b) {
      var va = cellValue(a, col, numeric), vb = cellValue(b, col, numeric);
      if (va === null || vb === null) {  // empty cells last, whichever the direction
        if (va === null && vb === null) { return (+a.getAttribute("data-i")) - (+b.getAttribute("data-i")); }
        return va === null ? 1 : -1;
      }
      var c = numeric ? (va < vb ? -1 : va > vb ? 1 : 0) : String(va).localeCompare(String(vb), undefined, { numeric: true });
      return c !== 0 ? sign * c : (+a.getAttribute("data-i")) - (+b.getAttribute("data-i"));
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    ths.forEach(function (th, i) {
      th.classList.remove("asc", "desc");
      if (i === col) { th.classList.add(dir); }
    });
    table.setAttribute("data-sorted", colName + ":" + dir);
  }

  function filterTable(table, text) {
    var words = text.toLowerCase().split(/\s+/).filter(function (w) { return w.length > 0; });
    var shown = 0, rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var t = rows[i].textContent.toLowerCase();
      var ok = words.every(function (w) { return t.indexOf(w) >= 0; });
      rows[i].hidden = !ok;
      if (ok) { shown++; }
    }
    var st = document.querySelector('.status[data-table="' + table.getAttribute("data-table") + '"]');
    if (st) { st.textContent = words.length ? shown + " of " + rows.length + " rows match" : ""; }
  }

  function setupTables() {
    document.querySelectorAll("table.data").forEach(function (table) {
      table.querySelectorAll("thead th").forEach(function (th) {
        th.addEventListener("click", function () {
          var dir = th.classList.contains("asc") ? "desc" : "asc";
          sortTable(table, th.getAttribute("data-col"), dir);
        });
      });
      if (table.classList.contains("drillable")) {
        table.tBodies[0].addEventListener("click", function (e) {
          var tr = e.target.closest("tr");
          if (tr) { showDrill(table, tr); }
        });
      }
    });
    document.querySelectorAll("input.filter").forEach(function (inp) {
      var table = document.getElementById("table-" + inp.getAttribute("data-table"));
      inp.addEventListener("input", function () { filterTable(table, inp.value); });
    });
  }

  /* ------------------------------------------------------------------ drill-down: one attention row */
  var DRILL = null;
  function drillData() {
    if (DRILL === null) {
      var el = document.getElementById("drill-data");
      DRILL = el ? JSON.parse(el.textContent) : { rows: {}, tokens: {}, scale: 1 };
      var sc = DRILL.scale || 1;
      var dec = function (a) { return a.map(function (x) { return x / sc; }); };
      Object.keys(DRILL.rows).forEach(function (k) {  // weights are stored as integers in units of 1 / scale
        var r = DRILL.rows[k];
        r.clean = dec(r.clean); r.joint = dec(r.joint); r.individual = r.individual.map(dec);
      });
    }
    return DRILL;
  }

  function fmt(x) {
    if (x === null || x === undefined || !isFinite(x)) { return "n/a"; }
    return Number(x).toPrecision(3).replace(/\.?0+(e|$)/, "$1");
  }

  function attentionRowFigure(row, tokens, units) {
    var q = row.query, keys = row.keys;
    var conds = [{ name: "clean run", w: row.clean, S: [] }];
    keys.forEach(function (k, n) {
      var t = "ablate key " + k + ": effect " + fmt(row.effects[n]) + " " + units;
      if (row.global_effects && row.global_effects[n] !== null) { t += " (global " + fmt(row.global_effects[n]) + ")"; }
      conds.push({ name: t, w: row.individual[n], S: [k] });
    });
    var tj = "ablate keys (" + keys.join(", ") + ") jointly: effect " + fmt(row.effect_joint) + " " + units;
    if (row.global_effect_joint !== null) { tj += " (global " + fmt(row.global_effect_joint) + ")"; }
    conds.push({ name: tj, w: row.joint, S: keys.slice() });
    // keys shown: any condition >= MIN_WEIGHT, the ablated ones always, at most MAX_KEYS; the rest pooled
    var maxw = [];
    for (var j = 0; j <= q; j++) { maxw.push(Math.max.apply(null, conds.map(function (c) { return c.w[j]; }))); }
    var show = {};
    keys.forEach(function (k) { show[k] = true; });
    var order = maxw.map(function (w, j) { return j; }).sort(function (a, b) { return maxw[b] - maxw[a]; });
    var room = MAX_KEYS - keys.length;
    order.forEach(function (j) { if (room > 0 && maxw[j] >= MIN_WEIGHT && !show[j]) { show[j] = true; room--; } });
    var pos = Object.keys(show).map(Number).sort(function (a, b) { return a - b; });
    var rest = q + 1 - pos.length;
    var labels = pos.map(function (j) { return j + ": " + (tokens[j] !== undefined ? tokens[j] : "#" + j); });
    if (rest > 0) { labels.push("other keys (" + rest + ")"); }
    var n = conds.length, gap = 0.05, h = (1 - gap * (n - 1)) / n;
    var data = [], annotations = [], layout = {};
    var ymax = 0;
    conds.forEach(function (c) { c.w.forEach(function (w) { if (w > ymax) { ymax = w; } }); });
    conds.forEach(function (c, i) {
      var y = pos.map(function (j) { return c.w[j]; });
      if (rest > 0) {
        var s = 0;
        for (var j = 0; j <= q; j++) { if (!show[j]) { s += c.w[j]; } }
        y.push(s);
      }
      var colors = labels.map(function (l, m) {
        if (m >= pos.length) { return NAN_COLOR; }
        return c.S.indexOf(pos[m]) >= 0 ? SR_COLOR : NOT_COLOR;
      });
      var ax = i === 0 ? "" : String(i + 1);
      data.push({ type: "bar", x: labels, y: y, marker: { color: colors }, name: c.name, showlegend: false,
                  xaxis: "x", yaxis: "y" + ax,
                  hovertemplate: "key %{x}<br>attention weight %{y:.4f}<extra>" + (i === 0 ? "clean" : "ablated") + "</extra>" });
      if (c.S.length) {  // where the ablated keys' weight was in the clean run (outlined)
        var ghostX = [], ghostY = [];
        c.S.forEach(function (k) { ghostX.push(labels[pos.indexOf(k)]); ghostY.push(row.clean[k]); });
        data.push({ type: "bar", x: ghostX, y: ghostY, xaxis: "x", yaxis: "y" + ax, name: "clean weight of an ablated key",
                    legendgroup: "ghost", showlegend: i === 1,
                    marker: { color: "rgba(0,0,0,0)", line: { color: SR_COLOR, width: 2 } },
                    hovertemplate: "key %{x}<br>clean weight %{y:.4f}<extra>before ablation</extra>" });
      }
      var top = 1 - i * (h + gap);
      layout["yaxis" + ax] = { domain: [top - h, top], range: [0, 1.15 * Math.max(ymax, 1e-9)], title: { text: "weight" },
                               anchor: "x" };
      annotations.push({ text: c.name, xref: "paper", yref: "paper", x: 0, y: top, xanchor: "left", yanchor: "bottom",
                         showarrow: false, font: { size: 13 } });
    });
    layout.xaxis = { anchor: "y" + (n === 1 ? "" : String(n)), tickangle: -60, type: "category",
                     title: { text: "key position: token (orange: the ablated keys)" } };
    layout.annotations = annotations;
    layout.height = 170 * n + 230;
    layout.margin = { t: 90, b: 140, l: 70, r: 20 };
    layout.template = undefined;
    layout.title = { text: "prompt " + row.prompt + ", L" + row.layer + "H" + row.head + ", query " + q + " (" +
                     (tokens[q] !== undefined ? tokens[q] : "#" + q) + "), keys (" + keys.join(", ") + ")<br><sup>" +
                     row.score_ablation + " ablation; sum of individual effects " +
                     fmt(row.effects.reduce(function (a, b) { return a + (b || 0); }, 0)) + ", joint " +
                     fmt(row.effect_joint) + " " + units + ", r = " + fmt(row.interaction) + "</sup>", x: 0.01 };
    layout.plot_bgcolor = "white";
    layout.barmode = "overlay";
    layout.legend = { orientation: "h", x: 1, xanchor: "right", y: 1, yanchor: "bottom" };
    return { data: data, layout: layout };
  }

  function showDrill(table, tr) {
    var id = table.getAttribute("data-table");
    var box = document.getElementById("drill-" + id);
    if (!box) { return; }
    var title = box.querySelector(".drill-title"), plot = box.querySelector(".drill-plot");
    table.querySelectorAll("tr.selected").forEach(function (r) { r.classList.remove("selected"); });
    tr.classList.add("selected");
    var key = tr.getAttribute("data-key");
    var d = drillData();
    var row = key ? d.rows[key] : null;
    box.setAttribute("data-shown", key || "");
    box.setAttribute("data-row", tr.getAttribute("data-i"));
    if (!row) {
      Plotly.purge(plot);
      title.textContent = "Group " + (key || "?") + " (prompt:layer:head:query) has no stored attention row " +
                          "(the run stores at most the groups in tables/attention_rows.parquet).";
      return;
    }
    var tokens = d.tokens[String(row.prompt)] || [];
    title.textContent = "Attention row of " + id + " row " + tr.getAttribute("data-i") + ": prompt " + row.prompt + ", layer " +
                        row.layer + ", head " + row.head + ", query " + row.query + ", keys (" + row.keys.join(", ") + ")";
    var fig = attentionRowFigure(row, tokens, d.units || "metric units");
    return Promise.resolve(Plotly.react(plot, fig.data, fig.layout, { responsive: true, displaylogo: false }))
      .then(function () { box.setAttribute("data-drawn", key); })
      .catch(function (e) { reportError("drill-down: " + e); });
  }

  /* ------------------------------------------------------------------ URL fragment */
  function applyHash() {
    var h = decodeURIComponent((window.location.hash || "").replace(/^#/, ""));
    var pending = [];
    if (!h) { return Promise.resolve(); }
    h.split("&").forEach(function (part) {
      var eq = part.indexOf("=");
      if (eq < 0) { return; }
      var what = part.slice(0, eq), args = part.slice(eq + 1).split(":");
      if (what === "at") {  // scroll an element to the top (screenshots)
        var el = document.getElementById(args[0]);
        if (el) { pending.push(Promise.resolve().then(function () { el.scrollIntoView({ block: "start" }); })); }
        return;
      }
      var table = document.getElementById("table-" + args[0]);
      if (!table) { return; }
      if (what === "sort" && args.length >= 2) {
        sortTable(table, args[1], args[2] === "desc" ? "desc" : "asc");
      } else if (what === "filter") {
        var text = args.slice(1).join(":");
        var inp = document.querySelector('input.filter[data-table="' + args[0] + '"]');
        if (inp) { inp.value = text; }
        filterTable(table, text);
      } else if (what === "drill" && args.length >= 2) {
        var tr = table.querySelector('tbody tr[data-i="' + args[1] + '"]');
        if (tr) { pending.push(Promise.resolve(showDrill(table, tr))); tr.scrollIntoView({ block: "nearest" }); }
      }
    });
    return Promise.all(pending);
  }

  function main() {
    if (typeof Plotly === "undefined") {
      reportError("plotly.js did not load (the page expects it inlined, or plotly.min.js beside it)");
      return;
    }
    setupTables();
    drawFigures().then(applyHash).then(function () { document.body.setAttribute("data-ready", "1"); })
      .catch(function (e) { reportError("report.js: " + e); });
    window.addEventListener("hashchange", applyHash);
  }

  try { main(); } catch (e) { reportError("report.js: " + (e && e.stack || e)); }
})();
