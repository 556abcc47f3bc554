"""Human-readable renderings of artifacts: self-contained HTML pages (inline CSS and SVG charts, no
script, nothing fetched from the network) and console tables."""
from __future__ import annotations

import html
from typing import Optional

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1f2933;margin:0;background:#f5f7fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d9e2ec;padding-bottom:4px}
.sub{color:#52606d;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:10px 14px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:#52606d;font-size:12px}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.ok{background:#e3f9e5;color:#1f7a38}.fail{background:#ffe3e3;color:#ab091e}.warn{background:#fff3c4;color:#8d6708}
table{border-collapse:collapse;background:#fff;width:100%;margin:6px 0}
td,th{border:1px solid #d9e2ec;padding:5px 8px;text-align:left;vertical-align:top}th{background:#f0f4f8;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:16px}
.panel{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:10px 12px}
.panel h3{font-size:14px;margin:0 0 6px}
code{background:#f0f4f8;border-radius:3px;padding:0 3px;font-size:12px}
.muted{color:#7b8794;font-size:12px}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return _e(v)


def page(title: str, subtitle: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body><main><h1>{_e(title)}</h1><p class='sub'>{subtitle}</p>{body}</main></body></html>")


def bar_chart(pairs: list, title: str, width: int = 460, height: int = 170, color: str = "#3e7cb1") -> str:
    """An inline SVG bar chart of ``[[label, value], ...]`` (labels thinned to fit)."""
    pairs = [(str(a), float(b)) for a, b in pairs]
    if not pairs:
        return f"<div class='panel'><h3>{_e(title)}</h3><p class='muted'>no data</p></div>"
    top = max(v for _, v in pairs) or 1.0
    left, bottom, plot_h = 44, 34, height - 44
    bw = (width - left - 8) / len(pairs)
    every = max(1, len(pairs) // 12)
    bars = []
    for i, (label, v) in enumerate(pairs):
        h = plot_h * v / top
        x = left + i * bw
        bars.append(f"<rect x='{x + 1:.1f}' y='{10 + plot_h - h:.1f}' width='{max(bw - 2, 1):.1f}' height='{h:.1f}' fill='{color}'>"
                    f"<title>{_e(label)}: {_num(int(v) if v.is_integer() else v)}</title></rect>")
        if i % every == 0:
            bars.append(f"<text x='{x + bw / 2:.1f}' y='{height - bottom + 14}' font-size='9' text-anchor='middle' "
                        f"fill='#52606d'>{_e(label[:10])}</text>")
    axis = (f"<line x1='{left}' y1='{10 + plot_h}' x2='{width - 8}' y2='{10 + plot_h}' stroke='#9aa5b1'/>"
            f"<text x='{left - 4}' y='16' font-size='9' text-anchor='end' fill='#52606d'>{_num(int(top) if top.is_integer() else top)}</text>"
            f"<text x='{left - 4}' y='{10 + plot_h}' font-size='9' text-anchor='end' fill='#52606d'>0</text>")
    svg = f"<svg viewBox='0 0 {width} {height}' width='100%' role='img' aria-label='{_e(title)}'>{axis}{''.join(bars)}</svg>"
    return f"<div class='panel'><h3>{_e(title)}</h3>{svg}</div>"


def _dist_row(label: str, d: Optional[dict]) -> str:
    if not d or not d.get("n"):
        return f"<tr><th>{_e(label)}</th><td colspan='7' class='muted'>none</td></tr>"
    cells = "".join(f"<td class='num'>{_num(d.get(k))}</td>" for k in ("min", "p25", "p50", "mean", "p90", "p99", "max"))
    return f"<tr><th>{_e(label)}</th>{cells}</tr>"


def _profile_sections(p: dict) -> str:
    s = p.get("stats", {})
    tail = p.get("long_tail", {})
    text = p.get("text", {})
    cards = "".join(f"<div class='card'><b>{v}</b><span>{_e(k)}</span></div>" for k, v in (
        ("users", _num(s.get("n_users"))), ("items", _num(s.get("n_items"))), ("interactions", _num(s.get("n_interactions"))),
        ("interactions / user", _num(s.get("avg_seq_len"))), ("density", f"{s.get('density', 0):.2e}"),
        ("item text coverage", f"{text.get('coverage', 0):.1%}")))
    act = p.get("activity", {})
    charts = "".join([
        bar_chart(p.get("per_user", {}).get("hist", []), "users by number of interactions (log2 bins)"),
        bar_chart(p.get("per_item", {}).get("hist", []), "items by number of interactions (log2 bins: the long tail)", color="#7b5ea7"),
        bar_chart(act.get("buckets", []), "interactions over time" + (" (per slice of the order)" if act.get("unit") == "order" else ""),
                  color="#2f8f83"),
        bar_chart(text.get("chars", {}).get("hist", []), "item text length, characters (log2 bins)", color="#c47f17"),
    ])
    dist = ("<table><tr><th></th><th>min</th><th>p25</th><th>median</th><th>mean</th><th>p90</th><th>p99</th><th>max</th></tr>"
            + _dist_row("interactions per user", p.get("per_user")) + _dist_row("interactions per item", p.get("per_item"))
            + _dist_row("item text length (chars)", text.get("chars")) + _dist_row("item text length (words)", text.get("words"))
            + "</table>")
    top = ", ".join(f"<code>{_e(i)}</code> ({_num(c)})" for i, c in tail.get("top_items", []))
    tail_txt = (f"<p>The 10% most-interacted items take <b>{tail.get('top10pct_items_share_of_interactions', 0):.1%}</b> of all "
                f"interactions; <b>{tail.get('items_with_under_5_interactions', 0):.1%}</b> of interacted items have fewer than 5. "
                f"Most-interacted: {top or 'none'}.</p>")
    when = ""
    if act.get("unit") == "date":
        when = f"<p class='muted'>Interactions from {_e(act.get('first'))} to {_e(act.get('last'))}.</p>"
    elif act.get("note"):
        when = f"<p class='muted'>{_e(act['note'])}.</p>"
    fields = ", ".join(f"<code>{_e(f)}</code> {v:.1%}" for f, v in text.get("per_field", {}).items())
    probs = p.get("problems", {})
    none, check = "<span class='badge ok'>none</span>", "<span class='badge warn'>check</span>"
    prob_rows = "".join(f"<tr><td>{_e(k.replace('_', ' '))}</td><td class='num'>{_num(v)}</td><td>{check if v else none}</td></tr>"
                        for k, v in probs.items())
    return (f"<h2>The data</h2><div class='cards'>{cards}</div><div class='grid'>{charts}</div>{when}"
            f"<h2>Distributions</h2>{dist}{tail_txt}"
            f"<p>Text fields and their coverage: {fields or 'none'}.</p>"
            f"<h2>Id and timestamp problems found</h2>"
            f"<p class='muted'>Counted on the data as ingested (ingestion already refuses unparseable ids and timestamps "
            f"and drops exact duplicates).</p><table><tr><th>problem</th><th>count</th><th></th></tr>{prob_rows}</table>")


def _change_section(previous: Optional[dict], current: Optional[dict]) -> str:
    from sidrec.data.profile import change

    if not current:
        return ""
    if not previous:
        return ("<h2>Change since the previous run</h2><p class='muted'>No previous run of this dataset in this state folder: "
                "the next run will be compared with this one.</p>")
    rows = []
    for r in change(previous, current):
        if r["change"] is None:
            ch = "-"
        elif r["relative"]:
            ch = f"{r['change']:+.1%}"
        else:
            ch = f"{r['change']:+,}" if isinstance(r["change"], int) else f"{r['change']:+.4g}"
        moved = r["change"] not in (None, 0, 0.0)
        rows.append(f"<tr><td>{_e(r['what'])}</td><td class='num'>{_num(r['previous'])}</td><td class='num'>{_num(r['current'])}</td>"
                    f"<td class='num'>{'<b>' + ch + '</b>' if moved else ch}</td></tr>")
    return (f"<h2>Change since the previous run</h2><p class='muted'>Previous run of <code>{_e(previous.get('dataset'))}</code>: "
            f"{_e(previous.get('created', '?'))}.</p><table><tr><th></th><th>previous</th><th>now</th><th>change</th></tr>"
            f"{''.join(rows)}</table>")


def quality_html(report) -> str:
    """The data-quality report: verdict, every expectation with its observed value, the data's profile
    (long tail, activity, text), the problems found, and the change since the previous run."""
    ok = bool(report.success)
    verdict = (f"<span class='badge {'ok' if ok else 'fail'}'>{'PASSED' if ok else 'FAILED'}</span> "
               f"{_e(report.summary())}")
    rows = "".join(
        "<tr><td>{suite}</td><td>{exp}<div class='muted'>{gx}</div></td><td><code>{col}</code></td><td>{ok}</td><td>{obs}</td></tr>".format(
            suite=_e(r.get("suite")), exp=_e(r.get("description") or r.get("expectation")), gx=_e(r.get("expectation", "")),
            col=_e(r.get("column")), obs=_e(r.get("observed")),
            ok="<span class='badge ok'>pass</span>" if r.get("success") else "<span class='badge fail'>FAIL</span>")
        for r in report.results)
    exp = ("<h2>Expectations</h2><table><tr><th>table</th><th>expectation</th><th>column</th><th>result</th><th>observed</th></tr>"
           f"{rows}</table><p class='muted'>The full Great Expectations Data Docs site is stored beside this page "
           "(data_docs/index.html).</p>")
    prof = getattr(report, "profile", None)
    name = prof.get("dataset", "") if prof else ""
    body = exp + (_profile_sections(prof) if prof else "") + _change_section(getattr(report, "previous", None), prof)
    sub = verdict + (f" &middot; dataset <code>{_e(name)}</code> &middot; {_e(prof.get('created', ''))}" if prof else "")
    return page("sidrec data quality", sub, body)


DRIFT_LABELS = {
    "baseline": "compared with", "new_fingerprint": "new data fingerprint", "new_interactions": "interactions now",
    "old_interactions": "interactions in the champion's data", "interaction_ratio": "interactions now / then",
    "new_users_total": "users now", "users_added": "users added", "users_removed": "users removed",
    "new_items_total": "items now", "items_added": "items added", "items_removed": "items removed",
    "items_added_sample": "items added (sample)", "items_removed_sample": "items removed (sample)",
    "popularity_tvd": "popularity shift (total variation, 0-1)", "new_text_coverage": "item text coverage now",
    "old_text_coverage": "item text coverage then", "text_coverage_change": "text coverage change", "same_data": "same data",
}


def drift_html(summary: dict) -> str:
    """The drift report: newest data vs the champion's training data, headline figures first."""
    if summary.get("baseline") == "none":
        sub = "<span class='badge warn'>no champion yet</span> nothing to compare with: the figures describe the new data only"
    elif summary.get("same_data"):
        sub = "<span class='badge ok'>same data</span> the new data is the champion's training data"
    else:
        tvd = float(summary.get("popularity_tvd", 0.0))
        sub = (f"<span class='badge {'warn' if tvd > 0.2 else 'ok'}'>popularity shift {tvd:.2f}</span> newest data vs the "
               f"champion's training data ({_e(summary.get('baseline'))})")
    head = [k for k in ("users_added", "users_removed", "items_added", "items_removed", "interaction_ratio", "popularity_tvd",
                        "text_coverage_change") if k in summary]
    head += [k for k in summary if k.startswith("top") and k.endswith("_overlap")]
    cards = "".join(f"<div class='card'><b>{_num(summary[k])}</b><span>{_e(DRIFT_LABELS.get(k, k.replace('_', ' ')))}</span></div>"
                    for k in head)

    def cell(v):
        if isinstance(v, list):
            return ", ".join(f"<code>{_e(x)}</code>" for x in v) or "<span class='muted'>none</span>"
        return _num(v)

    rows = "".join(f"<tr><th>{_e(DRIFT_LABELS.get(k, k.replace('_', ' ')))}</th><td>{cell(v)}</td><td><code>{_e(k)}</code></td></tr>"
                   for k, v in summary.items())
    body = (f"<div class='cards'>{cards}</div><h2>Every figure</h2>"
            f"<table><tr><th></th><th>value</th><th>MLflow name (drift/...)</th></tr>{rows}</table>")
    return page("sidrec data drift", sub, body)


def baseline_notes(metrics: dict) -> list[str]:
    """What a reader must know before comparing with a baseline (e.g. SASRec stopped before converging)."""
    notes = []
    if metrics.get("baseline/sasrec/converged") == 0.0:
        notes.append(f"SASRec baseline not converged: stopped after {int(metrics.get('baseline/sasrec/epochs_run', -1))} epochs "
                     "by baselines.sasrec.max_minutes or max_epochs before its early stopping (patience) on valid; "
                     "its numbers understate it, so the LLM's lift over it is overstated")
    return notes


def metrics_table(metrics: dict, split: str = "test", ks=(1, 5, 10, 20)) -> list[list[str]]:
    """Rows of a console table: metric, LLM, SASRec, popularity, LLM lift over SASRec (from
    :func:`sidrec.evaluation.evaluate.lift_table`)."""
    from sidrec.evaluation.evaluate import lift_table

    def cell(row, key):
        v = row.get(key)
        return "-" if v is None or v != v else f"{v:.4f}"

    out = []
    for row in lift_table(metrics, split, ks).to_dict("records"):
        lift = row.get("lift_vs_sasrec")
        out.append([row["metric"], f"{row['llm']:.4f}", cell(row, "sasrec"), cell(row, "popularity"),
                    "-" if lift is None or lift != lift else f"{lift:+.1%}"])
    return out
