"""Human-readable renderings of artifacts (HTML pages, console tables)."""
from __future__ import annotations

import html


def quality_html(report) -> str:
    """One self-contained page listing every expectation and its result."""
    rows = "".join(
        "<tr style='background:{bg}'><td>{suite}</td><td>{exp}</td><td>{col}</td><td>{ok}</td><td>{obs}</td></tr>".format(
            bg="#e8f5e9" if r.get("success") else "#ffebee", suite=html.escape(str(r.get("suite"))),
            exp=html.escape(str(r.get("description") or r.get("expectation"))), col=html.escape(str(r.get("column"))),
            ok="pass" if r.get("success") else "FAIL", obs=html.escape(str(r.get("observed"))))
        for r in report.results)
    return (f"<html><head><meta charset='utf-8'><title>sidrec data quality</title></head><body>"
            f"<h3>Data quality: {html.escape(report.summary())}</h3>"
            "<table border='1' cellpadding='4'><tr><th>suite</th><th>expectation</th><th>column</th><th>result</th><th>observed</th></tr>"
            f"{rows}</table><p>The full Great Expectations Data Docs site is stored beside this page (data_docs/index.html).</p>"
            "</body></html>")


def metrics_table(metrics: dict, split: str = "test", ks=(1, 5, 10, 20)) -> list[list[str]]:
    """Rows of a console table: metric, LLM, SASRec, popularity, LLM lift over SASRec."""
    out = []
    for name in ("recall", "ndcg"):
        for k in ks:
            key = f"{name}_at_{k}"
            llm = metrics.get(f"{split}/{key}")
            if llm is None:
                continue
            sas = metrics.get(f"baseline/sasrec/{split}/{key}")
            pop = metrics.get(f"baseline/popularity/{split}/{key}")
            lift = f"{(llm - sas) / sas:+.1%}" if sas else "-"
            out.append([f"{split}/{key}", f"{llm:.4f}", "-" if sas is None else f"{sas:.4f}",
                        "-" if pop is None else f"{pop:.4f}", lift])
    return out
