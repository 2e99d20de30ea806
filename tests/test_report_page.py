"""The run report (report.html) of a small real run, opened in headless Chromium.

One module-scoped run of ``selfrepair analyze`` (the shipped model, 32 code-copy
prompts, ~12 groups) plus ``tables/attention_rows.parquet`` written with
``attention_rows_table``; the report is built once and read by the tests.

Independent checks:
- the stored attention rows: clean rows against TransformerLens' own
  ``hook_pattern`` cache (``run_with_cache``), ablated rows against the SPEC
  formula applied in numpy to that pattern (``log p`` differs from the scores
  by a per-row constant, which mean ablation and knockout ignore);
- captions against counts computed here with pandas;
- sorting against pandas' sort of the table; the drill-down against the row
  the fragment names.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

# existing code (re-point these imports when the package layout changes)
from selfrepair import load_model, tasks
from selfrepair.study.cli import main as cli_main

from selfrepair.analysis.attention_rows import attention_rows_table, select_groups
from selfrepair.report import FigureSpec, TableSpec, build_report, register_section, unregister_section
from selfrepair.report.browser import dump_dom, find_chromium
from selfrepair.report.page import MAX_TABLE_ROWS, report_cli, report_main

N_PROMPTS = 32
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium/Chrome on this machine (install chromium "
                                                              "to run the browser tests)")


@pytest.fixture(scope="module")
def model():
    return load_model(None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("report") / "run"
    rc = cli_main(["analyze", "--n", str(N_PROMPTS), "--attribution-n", "4", "--no-png", "--threads", "1",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    g = pd.read_parquet(out / "tables" / "groups.parquet")
    assert len(g) >= 5, f"the fixture run found only {len(g)} groups; the sort test needs several"
    return out


def test_analyze_writes_the_report_and_its_drilldown_table(run_dir):
    """`selfrepair analyze` builds report.html last and lists it (and the drill-down table) in summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "report.html").is_file() and "report.html" in summary["files"]
    assert "tables/attention_rows.parquet" in summary["files"]
    assert "report" in summary["timings_s"]


@pytest.fixture(scope="module")
def report(run_dir):
    return build_report(run_dir, strict=True)


@pytest.fixture(scope="module")
def groups(run_dir):
    return pd.read_parquet(run_dir / "tables" / "groups.parquet")


# ----------------------------------------------------------------------------- attention rows vs TransformerLens


def test_attention_rows_match_transformerlens_pattern(run_dir, model, groups):
    rows = pd.read_parquet(run_dir / "tables" / "attention_rows.parquet")
    settings = json.loads((run_dir / "summary.json").read_text())["settings"]
    assert len(rows) == len(groups)  # default max_groups=500 keeps all of them
    task = tasks.load("code-copy", model, n=N_PROMPTS, seed=0)
    _, cache = model.run_with_cache(task.tokens)
    for r in rows.itertuples():
        g = groups.iloc[int(r.group)]
        assert tuple(int(g[c]) for c in ("prompt", "layer", "head", "query")) == (r.prompt, r.layer, r.head, r.query)
        q, keys = int(r.query), [int(k) for k in r.keys]
        assert keys == [int(k) for k in g["keys"]]
        p = cache[f"blocks.{r.layer}.attn.hook_pattern"][r.prompt, r.head, q, : q + 1].double().numpy()
        clean = np.asarray(r.clean, float)
        # float32 model pattern vs the float64 recomputation from float32 scores: a few float32 ulps of p <= 1
        np.testing.assert_allclose(clean, p, rtol=0, atol=1e-6)
        np.testing.assert_allclose(clean[keys], np.asarray(g["p"], float), rtol=0, atol=1e-6)
        assert len(r.tokens) == q + 1 and len(r.individual) == len(keys)
        # SPEC mean ablation on log p (= scores - const): a'_S = mean over the row's unmasked keys
        lp = np.log(np.maximum(p, 1e-300))
        ref = np.arange(1 if settings["exclude_bos"] else 0, q + 1)

        def ablate(S):
            b = lp.copy()
            b[S] = lp[ref].mean()
            e = np.exp(b - b.max())
            return e / e.sum()

        # log p of a float32 pattern carries ~1e-7 relative error per entry; exp/normalise keeps it ~1e-6 absolute
        for j, row in zip(keys, r.individual):
            np.testing.assert_allclose(np.asarray(row, float), ablate([j]), rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.asarray(r.joint, float), ablate(keys), rtol=0, atol=2e-6)
        assert np.isclose(r.effect_joint, g["effect_joint"]) and np.isclose(r.interaction, g["interaction"],
                                                                            equal_nan=True)


def test_select_groups_caps_and_prefers_self_repairing(groups):
    m = 3
    pos = select_groups(groups, m)
    assert len(pos) == m and list(pos) == sorted(pos)
    # independent: the explicit ranking the docstring promises
    size = (groups["effect_joint"] - groups["effect_sum"]).abs()
    ranked = sorted(range(len(groups)), key=lambda i: (not bool(groups["self_repair"].iloc[i]), -size.iloc[i], i))
    assert set(pos) == set(ranked[:m])
    assert list(select_groups(groups, None)) == list(range(len(groups)))


def test_attention_rows_bad_input(model, groups):
    task = tasks.load("code-copy", model, n=4, seed=0)
    g = groups.copy()
    g.attrs["settings"] = {"score_ablation": "mean"}
    if int(g["prompt"].max()) >= 4:
        with pytest.raises(ValueError, match="pass the task the result was computed on"):
            attention_rows_table(model, task, g)
    g.attrs["settings"] = {"score_ablation": "zero"}
    with pytest.raises(ValueError, match="unknown score_ablation 'zero'"):
        attention_rows_table(model, task, g.iloc[:0])
    g.attrs["settings"] = {"ablation": "zero"}  # settings written before the rename are read under the new name
    with pytest.raises(ValueError, match="unknown score_ablation 'zero'"):
        attention_rows_table(model, task, g.iloc[:0])


# ----------------------------------------------------------------------------- the page as built


def test_report_is_self_contained_and_has_every_stage(report, run_dir, groups):
    html = report.read_text(encoding="utf-8")
    assert report == run_dir / "report.html"
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    assert bundle in html  # plotly.js inlined (its own text names cdn.plot.ly for geo maps, which no figure uses)
    rest = html.replace(bundle, "")
    assert not re.search(r"(src|href)=\"?(https?:)?//", rest), "a resource from the network"
    assert "cdn.plot.ly" not in rest and "<link" not in rest
    for key in ("self_repair", "local_global", "estimates", "head_ranking", "token_attributions", "attention_row"):
        assert f'id="sec-{key}"' in html
    for name in ("groups", "head_summary", "estimates", "heads", "faithfulness"):
        n = len(pd.read_parquet(run_dir / "tables" / f"{name}.parquet"))
        block = html.split(f'id="table-{name}"', 1)[1].split("</table>", 1)[0]
        assert block.count("<tr data-i=") == min(n, MAX_TABLE_ROWS)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"]["weights_sha256"] in html and summary["versions"]["torch"] in html
    # caption from this run's numbers (counted here with pandas)
    r = groups["interaction"].astype(float)
    d = r[np.isfinite(r)]
    t = summary["settings"]["threshold"]
    assert f"{int((d > t).sum())} of the {len(d)} groups with a defined local ratio" in html


def test_registry_adds_a_stage_and_skips_absent_tables(tmp_path, run_dir):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    df = pd.DataFrame({"layer": [0, 1, 2], "score": [0.5, -1.25, 3.0]})
    df.to_parquet(rd / "tables" / "later_stage.parquet", index=False)
    import plotly.graph_objects as go

    register_section("later", "A later stage", order=95,
                     figures=[FigureSpec("bars", lambda run: go.Figure(go.Bar(x=run.tables["later_stage"]["layer"],
                                                                               y=run.tables["later_stage"]["score"])),
                                         lambda run: f"max score {run.tables['later_stage']['score'].max():g}",
                                         needs=("later_stage",))],
                     tables=[TableSpec("later_stage", "Later stage")])
    register_section("absent", "Never shown", order=96, tables=[TableSpec("no_such_table", "Nope")])
    try:
        html = build_report(rd, strict=True).read_text(encoding="utf-8")
    finally:
        unregister_section("later")
        unregister_section("absent")
    assert 'id="sec-later"' in html and "max score 3" in html and 'id="table-later_stage"' in html
    assert 'id="sec-absent"' not in html
    (rd / "tables" / "later_stage.parquet").unlink()
    html2 = build_report(rd, out=rd / "again.html", strict=True).read_text(encoding="utf-8")
    assert 'id="sec-later"' not in html2


def test_report_main_errors_are_one_line(tmp_path, capsys):
    assert report_main(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no summary.json" in err
    assert report_cli([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_run_without_groups_still_reports(tmp_path, run_dir, capsys):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    for name in ("attention_row", "attention_rows"):
        (rd / "tables" / f"{name}.parquet").unlink()
    pd.read_parquet(rd / "tables" / "groups.parquet").iloc[:0].to_parquet(rd / "tables" / "groups.parquet")
    assert report_cli([str(rd), "--plotlyjs", "directory"]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (rd / "report.html").read_text(encoding="utf-8")
    assert 'id="fig-self_repair-joint_vs_sum"' not in html and 'id="sec-attention_row"' not in html
    assert 'id="table-groups"' in html and "stores no attention rows" in html and 'id="sec-head_ranking"' in html


# ----------------------------------------------------------------------------- in a real browser


class _Dom(HTMLParser):
    """Row order of each data table, the error box, plot containers and the drill-down box of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.table = None
        self.rows: dict[str, list[int]] = {}
        self.plots: dict[str, dict] = {}
        self.stack: list[str] = []
        self.errors = None
        self.in_errors = False
        self.drill: dict[str, dict] = {}
        self.body = {}
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "body":
            self.body = a
        if tag == "table" and "data" in cls:
            self.table = a["data-table"]
            self.rows[self.table] = []
        if tag == "tr" and self.table and "data-i" in a:
            self.rows[self.table].append(int(a["data-i"]))
        if tag == "div" and a.get("id") == "js-errors":
            self.in_errors, self.errors = True, ""
        if tag == "div" and "plot" in cls:
            self.plots[a["id"]] = {"svg": 0}
            self.stack.append(a["id"])
        elif tag == "div" and self.stack:
            self.stack.append("")
        if tag == "svg" and "main-svg" in cls and self.stack:
            owner = next(s for s in reversed(self.stack) if s)
            self.plots[owner]["svg"] += 1
        if tag == "div" and "drill" in cls:
            self.drill[a["data-table"]] = a

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        if tag == "div":
            self.in_errors = False
            if self.stack:
                self.stack.pop()

    def handle_data(self, data):
        if self.in_errors:
            self.errors += data
        self.texts.append(data)


def _parse(dom: str) -> _Dom:
    p = _Dom()
    p.feed(dom)
    return p


@pytest.fixture(scope="module")
def sorted_dom(report):
    if CHROMIUM is None:
        pytest.skip("no Chromium/Chrome on this machine")
    return dump_dom(report, "sort=groups:interaction:desc&drill=groups:3")


@needs_chromium
def test_page_renders_every_figure_without_js_errors(sorted_dom):
    d = _parse(sorted_dom)
    assert d.errors is not None and d.errors.strip() == "", f"JavaScript errors: {d.errors}"
    assert d.body.get("data-ready") == "1"
    assert int(d.body["data-figures"]) >= 9 and d.body["data-figures-drawn"] == d.body["data-figures"]
    figs = {k: v for k, v in d.plots.items() if k.startswith("fig-")}
    assert len(figs) == int(d.body["data-figures"])
    empty = [k for k, v in figs.items() if v["svg"] == 0]
    assert not empty, f"figure containers without a plot: {empty}"
    assert 'class="figure-error"' not in sorted_dom


@needs_chromium
def test_sorting_reorders_rows(sorted_dom, groups):
    d = _parse(sorted_dom)
    order = d.rows["groups"]
    r = groups["interaction"].astype(float)
    # independent: descending by r, NaN last, ties by table position
    expect = sorted(range(len(groups)), key=lambda i: (np.isnan(r.iloc[i]), -np.nan_to_num(r.iloc[i]), i))
    assert order == expect
    assert order != sorted(order) or list(r) == sorted(r, reverse=True)


@needs_chromium
def test_drill_down_shows_the_chosen_row(sorted_dom, groups, run_dir):
    d = _parse(sorted_dom)
    g = groups.iloc[3]
    key = ":".join(str(int(g[c])) for c in ("prompt", "layer", "head", "query"))
    box = d.drill["groups"]
    assert box.get("data-row") == "3" and box.get("data-shown") == key and box.get("data-drawn") == key
    assert d.plots["drill-plot-groups"]["svg"] > 0
    text = " ".join(d.texts)
    assert f"prompt {int(g['prompt'])}, layer {int(g['layer'])}, head {int(g['head'])}, query {int(g['query'])}" in text
    for k in g["keys"]:  # one panel per individual ablation, titled with its key and effect
        assert f"ablate key {int(k)}: effect" in text
    assert "jointly: effect" in text


@needs_chromium
def test_plotlyjs_directory_mode_opens_offline(tmp_path, run_dir):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    page = build_report(rd, plotlyjs="directory", strict=True)
    assert (rd / "plotly.min.js").is_file() and page.stat().st_size < 3_000_000
    d = _parse(dump_dom(page))
    assert d.errors.strip() == "" and d.body.get("data-ready") == "1"


@needs_chromium
def test_clicks_sort_filter_and_drill_in_playwright(report, groups):
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("http*://**", lambda route: (errors.append(f"network: {route.request.url}"), route.abort()))
            page.goto(report.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            th = page.locator("#table-groups th[data-col='effect_joint']")
            th.click()
            order = [int(x) for x in page.eval_on_selector_all("#table-groups tbody tr", "rs => rs.map(r => r.dataset.i)")]
            ej = groups["effect_joint"].astype(float)
            assert order == sorted(range(len(groups)), key=lambda i: (ej.iloc[i], i))
            th.click()
            assert page.get_attribute("#table-groups", "data-sorted") == "effect_joint:desc"
            page.locator("#table-groups tbody tr").nth(1).click()
            i = order[::-1][1] if len(set(ej)) == len(ej) else None
            page.wait_for_selector("#drill-groups[data-drawn]")
            if i is not None:
                g = groups.iloc[i]
                assert page.get_attribute("#drill-groups", "data-shown") == \
                    ":".join(str(int(g[c])) for c in ("prompt", "layer", "head", "query"))
            # the drawn bars are the stored weights (integers of 1e-5 on the page: within 0.5e-5 + float noise)
            shown = page.get_attribute("#drill-groups", "data-shown")
            rows = pd.read_parquet(report.parent / "tables" / "attention_rows.parquet")
            r = rows[[":".join(str(int(x[c])) for c in ("prompt", "layer", "head", "query")) == shown
                      for _, x in rows.iterrows()]].iloc[0]
            data = page.evaluate("() => document.getElementById('drill-plot-groups').data.map(t => [t.x, t.y])")
            conds = [np.asarray(r["clean"]), *[np.asarray(v) for v in r["individual"]], np.asarray(r["joint"])]
            main = [t for t in data if len(t[0]) > len(r["keys"])] or data[:len(conds)]
            assert len(main) == len(conds)
            for (xs, ys), w in zip(main, conds):
                for x, y in zip(xs, ys):
                    if not x.startswith("other"):
                        assert abs(y - w[int(x.split(":")[0])]) <= 6e-6, (x, y)
                assert abs(sum(ys) - 1) <= 1e-4 * len(ys)  # the pooled bar holds the rest of the row
            # the filter keeps rows containing every word: self_repair is the only column written yes / no
            n_sr = int(groups["self_repair"].astype(bool).sum())
            for word, expect in (("yes", n_sr), ("no", len(groups) - n_sr)):
                page.fill("input.filter[data-table='groups']", word)
                visible = page.eval_on_selector_all("#table-groups tbody tr", "rs => rs.filter(r => !r.hidden).length")
                assert visible == expect, (word, visible, expect)
            assert errors == [], errors
        finally:
            browser.close()
