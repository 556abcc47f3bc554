"""Great Expectations Data Docs that render offline, styled.

GE's Data Docs pages load Bootstrap, Font Awesome, jQuery and bootstrap-table from CDNs; offline (an
air-gapped cluster, a laptop on a train, an MLflow artifact opened later) the pages are unstyled and the
index page -- whose tables bootstrap-table fills in from JavaScript -- shows empty lists. After each
build, :func:`make_offline` rewrites every page of a site in place: the CDN stylesheets and scripts are
replaced by one inline stylesheet (:data:`OFFLINE_CSS`, written for the classes the pages use), and each
JavaScript-filled table becomes a plain HTML table with the same columns, rows and row links.
"""
from __future__ import annotations

import ast
import html
import re
from pathlib import Path

OFFLINE_CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#d9e2ec; --bg:#f5f7fa; --ok:#2f855a; --bad:#c53030; --accent:#2b6cb0; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; color:var(--fg); background:#fff; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
h1,h2,h3,h4,h5,.h6 { margin:.4em 0 .3em; font-weight:600; line-height:1.25; } h1{font-size:1.6em} h2{font-size:1.35em} h3{font-size:1.15em}
.navbar { display:flex; align-items:center; gap:1rem; padding:.5rem 1.25rem; border-bottom:1px solid var(--line); background:#fff; }
.navbar-brand img { height:28px; } .sticky-top { position:sticky; top:0; z-index:10; }
.container-fluid { width:100%; padding:1rem 1.5rem; }
.row { display:flex; flex-wrap:wrap; gap:0; }
.col-md-2,.col-lg-2 { flex:0 0 18%; max-width:18%; padding-right:1rem; }
.col-md-10,.col-lg-10 { flex:1 1 0; min-width:0; }
.col-12 { flex:0 0 100%; max-width:100%; } .col-6 { flex:0 0 50%; max-width:50%; padding-right:1rem; }
.card { border:1px solid var(--line); border-radius:6px; background:#fff; margin-bottom:1rem; }
.card-header { padding:.5rem .75rem; border-bottom:1px solid var(--line); background:var(--bg); font-weight:600; }
.card-body { padding:.75rem; }
.nav { list-style:none; margin:0; padding:0; } .nav-item { margin:.15rem 0; }
.nav-link { display:block; padding:.25rem .5rem; border-radius:4px; } .nav-link:hover { background:var(--bg); }
.ge-navigation-sidebar-container { background:var(--bg); border-radius:6px; padding:.5rem; }
.breadcrumb { display:flex; gap:.5rem; list-style:none; margin:0; padding:0; }
.d-none { display:none; } .collapse:not(.show) { display:none; } .sr-only { position:absolute; left:-9999px; }
table, .table { width:100%; border-collapse:collapse; margin:.25rem 0 1rem; font-size:13px; }
.table th, .table td { padding:.35rem .5rem; border-top:1px solid var(--line); vertical-align:top; text-align:left; }
.table thead th { border-bottom:2px solid var(--line); background:var(--bg); white-space:nowrap; }
.table tbody tr:hover { background:#f0f4f8; }
.table-responsive { overflow-x:auto; } .show-scrollbars { overflow:auto; }
.badge { display:inline-block; padding:.1em .45em; border-radius:4px; font-size:12px; background:#e4e7eb; color:var(--fg); }
.alert { padding:.5rem .75rem; border-radius:6px; background:var(--bg); border:1px solid var(--line); margin:.5rem 0; }
.lead { font-size:1.1em; color:var(--muted); }
.text-success { color:var(--ok); } .text-danger { color:var(--bad); } .text-muted { color:var(--muted); }
.btn, .btn-group, button { display:none; }  /* filters and toggles need the scripts this page no longer loads */
.cooltip { position:relative; } .cooltip .top { display:none; }
.cooltip:hover .top { display:block; position:absolute; z-index:5; left:0; top:1.4em; min-width:22em; white-space:pre-wrap;
  background:#fff; border:1px solid var(--line); border-radius:6px; padding:.5rem; font:12px/1.4 ui-monospace,monospace; }
i.fas, i.far { font-style:normal; }
.fa-check-circle::before { content:"\\2714"; } .fa-times-circle::before, .fa-times::before { content:"\\2718"; color:var(--bad); }
.fa-exclamation-triangle::before { content:"\\26A0"; } .fa-info-circle::before { content:"\\2139"; }
.m-0{margin:0} .mb-0{margin-bottom:0} .mb-1{margin-bottom:.25rem} .mb-2{margin-bottom:.5rem} .mb-3{margin-bottom:1rem} .mb-4{margin-bottom:1.5rem}
.mt-1{margin-top:.25rem} .ml-1{margin-left:.25rem} .ml-2{margin-left:.5rem} .p-0{padding:0} .p-1{padding:.25rem} .p-2{padding:.5rem} .p-3{padding:.75rem}
"""

_CDN_LINK = re.compile(r"<link\b[^>]*href=\"https?://[^\"]*\"[^>]*>", re.I)
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.I | re.S)
_REMOTE_IMG = re.compile(r"<img\b[^>]*src=\"https?://[^\"]*\"[^>]*>", re.I)
_INIT = re.compile(r"\$\('#(?P<id>[^']+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*columns:\s*(?P<cols>.*?),\s*\n\s*data:\s*"
                   r"(?P<data>.*?),\s*\n\s*toolbar:", re.S)
MARKER = "sidrec-offline"


def _static_table(table_id: str, columns: list[dict], rows: list[dict]) -> str:
    """A bootstrap-table's columns and rows as plain HTML (cells keep GE's own markup; a row's link goes on
    its first cell)."""
    cols = [c for c in columns if c.get("field") and not str(c["field"]).startswith("_")]
    head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in cols)
    body = []
    for row in rows:
        link = row.get("_table_row_link_path")
        cells = []
        for i, c in enumerate(cols):
            value = str(row.get(c["field"], ""))
            if i == 0 and link:
                value = f'<a href="{html.escape(str(link), quote=True)}">{value}</a>'
            cells.append(f"<td>{value}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="{html.escape(table_id, quote=True)}" class="table table-sm"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def offline_page(page: str) -> str:
    """One Data Docs page, rewritten to need nothing from the network (idempotent)."""
    if MARKER in page:
        return page
    tables = {}
    for m in _INIT.finditer(page):
        try:
            tables[m["id"]] = _static_table(m["id"], ast.literal_eval(m["cols"]), ast.literal_eval(m["data"]))
        except (ValueError, SyntaxError):  # not a literal: leave that table to the scripts (online only)
            continue
    for table_id, static in tables.items():
        empty = re.compile(rf"<table\s[^>]*id=\"{re.escape(table_id)}\"[^>]*>\s*</table>", re.S)
        page = empty.sub(lambda _m, s=static: s, page, count=1)
    page = _CDN_LINK.sub("", page)
    page = _SCRIPT.sub("", page)
    page = _REMOTE_IMG.sub("", page)
    style = f'<style id="{MARKER}">{OFFLINE_CSS}</style>'
    page = re.sub(r"</head>", lambda _m: style + "</head>", page, count=1, flags=re.I)
    return page


def make_offline(site_dir: Path) -> int:
    """Rewrite every ``.html`` page of a Data Docs site in place; returns the number of pages."""
    n = 0
    for path in Path(site_dir).rglob("*.html"):
        text = path.read_text(encoding="utf-8")
        new = offline_page(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
        n += 1
    return n
