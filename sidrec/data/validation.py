"""Data-quality checks with Great Expectations (1.x): a file Data Context, one Checkpoint per suite, and a
Data Docs site with every validation run, readable offline.

Three suites run against the canonical `Dataset`:

- ``interactions``: ids and timestamps present; every interacted item has a row in ``items``;
- ``items``: item ids present and unique; enough items have text (``mostly=min_text_share``);
- ``users`` (a per-user table computed with pandas): enough interactions per user; timestamps
  non-decreasing within each user's sequence.

Every expectation is critical: `raise_on_failure` raises `ValidationFailed` with a one-line summary.
Great Expectations is imported lazily (it is slow to import).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from sidrec.config import ValidationConfig
from sidrec.errors import DataError, ValidationFailed
from sidrec.runtime import file_lock

SITE_NAME = "sidrec_data_docs"


@dataclass
class QualityReport:
    success: bool
    results: list[dict] = field(default_factory=list)
    docs_dir: Optional[str] = None
    # the data's profile (sidrec.data.profile.profile_dataset) and the previous run's profile of the same
    # dataset, for the report's charts and its "what changed" table
    profile: Optional[dict] = None
    previous: Optional[dict] = None

    def failures(self) -> list[dict]:
        return [r for r in self.results if r["critical"] and not r["success"]]

    def summary(self) -> str:
        fails = self.failures()
        if not fails:
            return f"data validation passed ({len(self.results)} expectations)"
        parts = [f"{r['suite']}.{r['column']} {r['description']} ({r['observed']})" for r in fails]
        return "data validation failed: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {"success": bool(self.success), "results": [dict(r) for r in self.results], "docs_dir": self.docs_dir,
                "profile": self.profile, "previous": self.previous}

    @classmethod
    def from_json(cls, data: dict) -> "QualityReport":
        return cls(success=bool(data["success"]), results=[dict(r) for r in data.get("results", [])], docs_dir=data.get("docs_dir"),
                   profile=data.get("profile"), previous=data.get("previous"))


def raise_on_failure(report: QualityReport) -> None:
    if not report.success:
        raise ValidationFailed(report.summary())


# ----------------------------------------------------------------------------------------------
# tables to validate
# ----------------------------------------------------------------------------------------------
def _item_text(items: pd.DataFrame, text_fields: list[str]) -> pd.Series:
    """Each item's joined text (:func:`sidrec.data.profile.joined_text`), None where it has none."""
    from sidrec.data.profile import joined_text, text_columns

    cols = text_columns(items, text_fields)
    if not cols:
        return pd.Series([None] * len(items), index=items.index, dtype=object)
    text = joined_text(items, cols)
    return text.astype(object).where(text != "", None)


def _user_table(inter: pd.DataFrame) -> pd.DataFrame:
    u = inter["user_id"]
    ts = inter["timestamp"]
    back = ts.groupby(u, sort=False).diff() < 0  # a timestamp earlier than the previous one of that user
    per_user = pd.DataFrame({"user_id": u, "_back": back.to_numpy()}).groupby("user_id", sort=False)
    out = per_user.agg(n_interactions=("_back", "size"), _n_back=("_back", "sum")).reset_index()
    out["ordered"] = out["_n_back"] == 0
    return out[["user_id", "n_interactions", "ordered"]].astype({"n_interactions": "int64", "ordered": bool})


# ----------------------------------------------------------------------------------------------
# Great Expectations
# ----------------------------------------------------------------------------------------------
def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def _fmt(v: Any) -> str:
    return f"'{v}'" if isinstance(v, str) else repr(v.item() if hasattr(v, "item") else v)


def _observed(res: Any, column: str) -> str:
    """Short text of what was observed, e.g. "12 unexpected of 99287, e.g. 'x', 'y'"."""
    r = res.result or {}
    if r.get("unexpected_count") is not None:
        n = int(r["unexpected_count"])
        total = r.get("element_count")
        text = f"{n} unexpected" + (f" of {total}" if total is not None else "")
        if n:
            idx = r.get("partial_unexpected_index_list") or []
            if idx and isinstance(idx[0], dict) and "user_id" in idx[0]:
                sample = [
                    f"user '{d['user_id']}'" + ("" if column == "ordered" else f" ({_fmt(d.get(column))})")
                    for d in idx[:3]
                ]
            else:
                sample = [_fmt(v) for v in (r.get("partial_unexpected_list") or [])[:3]]
            if sample:
                text += ", e.g. " + ", ".join(sample)
        return text
    if "observed_value" in r:
        return f"observed {r['observed_value']}"
    if res.exception_info and res.exception_info.get("raised_exception"):
        msg = str(res.exception_info.get("exception_message") or "error").splitlines()[0]
        return f"error: {msg[:120]}"
    return "ok" if res.success else "failed"


def _plan(gxe, inter: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, item_ids: list[str],
          cfg: ValidationConfig) -> list:
    """The suites: ``[(table, frame, [(expectation, column, description), ...]), ...]``."""
    min_share = float(cfg.min_text_share)
    return [
        (
            "interactions",
            inter,
            [
                (gxe.ExpectColumnValuesToNotBeNull(column="user_id"), "user_id", "not null"),
                (gxe.ExpectColumnValuesToNotBeNull(column="item_id"), "item_id", "not null"),
                (gxe.ExpectColumnValuesToNotBeNull(column="timestamp"), "timestamp", "not null"),
                (gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=item_ids), "item_id", "values in items table"),
            ],
        ),
        (
            "items",
            items,
            [
                (gxe.ExpectColumnValuesToNotBeNull(column="item_id"), "item_id", "not null"),
                (gxe.ExpectColumnValuesToBeUnique(column="item_id"), "item_id", "unique"),
                (
                    gxe.ExpectColumnValuesToNotBeNull(column="text", mostly=min_share),
                    "text",
                    f"non-empty for >= {min_share:.0%} of items",
                ),
            ],
        ),
        (
            "users",
            users,
            [
                (
                    gxe.ExpectColumnValuesToBeBetween(column="n_interactions", min_value=int(cfg.min_history)),
                    "n_interactions",
                    f">= {int(cfg.min_history)} per user",
                ),
                (gxe.ExpectColumnValuesToBeInSet(column="ordered", value_set=[True]), "ordered", "timestamps non-decreasing per user"),
            ],
        ),
    ]



def _replace(factory, obj):
    """Store ``obj`` (a suite, validation definition or checkpoint) under its name in a file Data Context,
    replacing the previous run's: the suites follow the config (``min_history``, ``min_text_share``), while
    the validation *results* of earlier runs stay in the context's store and on its Data Docs site."""
    try:
        factory.delete(obj.name)
    except Exception:  # not there yet
        pass
    return factory.add(obj)


def _batch_definition(source, table: str):
    """The whole-dataframe batch definition of asset ``table`` (kept in a file context from earlier runs)."""
    try:
        asset = source.get_asset(table)
    except LookupError:
        asset = source.add_dataframe_asset(name=table)
    try:
        return asset.get_batch_definition(f"{table}_all")
    except (KeyError, LookupError):
        return asset.add_batch_definition_whole_dataframe(f"{table}_all")


def _file_context(gx, project_dir: Path):
    """The file Data Context under ``project_dir`` (created on first use) with the Data Docs site
    ``SITE_NAME`` in ``uncommitted/data_docs/``."""
    context = gx.get_context(mode="file", project_root_dir=str(project_dir))
    if SITE_NAME not in context.get_site_names():
        context.add_data_docs_site(
            site_name=SITE_NAME,
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": f"uncommitted/data_docs/{SITE_NAME}/"},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def validate_dataset(ds, cfg: ValidationConfig, project_dir: Optional[Path]) -> QualityReport:
    """Run the three suites, each through a GE Checkpoint.

    ``project_dir``: the folder of a file Data Context (``<project_dir>/gx``, created on first use; the
    pipeline's is ``$SIDREC_HOME``): suites, validation definitions and checkpoints are stored there, every
    checkpoint run adds its result, and ``UpdateDataDocsAction`` updates the Data Docs site, so it lists
    every validation run side by side; the site is rewritten to render offline
    (:mod:`sidrec.data.data_docs`) and is the report's ``docs_dir``. ``None``: an ephemeral context, no docs.
    The report's ``success`` is the checkpoints' own verdict."""
    _quiet_gx()
    import great_expectations as gx  # noqa: WPS433 (slow import, kept local)
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint import UpdateDataDocsAction

    _quiet_gx()

    inter = ds.interactions[["user_id", "item_id", "timestamp"]].copy()
    items = pd.DataFrame({"item_id": ds.items["item_id"], "text": _item_text(ds.items, list(ds.text_fields))})
    users = _user_table(ds.interactions)
    item_ids = sorted(set(ds.items["item_id"].dropna().astype(str)))

    plan = _plan(gxe, inter, items, users, item_ids, cfg)
    project = Path(project_dir).resolve() if project_dir is not None else None
    site: Optional[Path] = None
    try:
        # one validation at a time per file Data Context (two runs would race on its YAML and stores)
        with file_lock(project / ".sidrec-validation.lock") if project is not None else contextlib.nullcontext():
            if project is None:
                context = gx.get_context(mode="ephemeral")
            else:
                context = _file_context(gx, project)
                site = Path(context.root_directory) / "uncommitted" / "data_docs" / SITE_NAME
            from great_expectations.core.run_identifier import RunIdentifier
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            source = context.data_sources.add_or_update_pandas(name=f"sidrec_{ds.name}".replace(" ", "_") or "sidrec")
            results: list[dict] = []
            verdicts: list[bool] = []
            actions = [UpdateDataDocsAction(name="update_data_docs", site_names=[SITE_NAME])] if site is not None else []
            for table, frame, exps in plan:
                batch_def = _batch_definition(source, table)
                suite = _replace(context.suites, gx.ExpectationSuite(name=f"{ds.name}.{table}"))
                meta = {}
                for exp, col, desc in exps:
                    added = suite.add_expectation(exp)
                    meta[str(added.id)] = (col, desc)
                vd = _replace(context.validation_definitions,
                              gx.ValidationDefinition(name=f"{ds.name}.{table}.validation", data=batch_def, suite=suite))
                fmt: Any = {"result_format": "BASIC"}
                if "user_id" in frame.columns and table == "users":
                    fmt = {"result_format": "SUMMARY", "unexpected_index_column_names": ["user_id"], "partial_unexpected_count": 3}
                checkpoint = _replace(context.checkpoints, gx.Checkpoint(
                    name=f"{ds.name}.{table}", validation_definitions=[vd], actions=actions, result_format=fmt))
                # the run name says which data was validated (the Data Docs list shows it beside the time)
                run = checkpoint.run(batch_parameters={"dataframe": frame},
                                     run_id=RunIdentifier(run_name=f"{ds.name}-{ds.fingerprint()[:8]}"))
                verdicts.append(bool(run.success))
                (res,) = run.run_results.values()
                by_id = {str(r.expectation_config.id): r for r in res.results}
                for exp_id, (col, desc) in meta.items():
                    r = by_id[exp_id]
                    results.append({"suite": table, "expectation": r.expectation_config.type, "column": col,
                                    "description": desc, "success": bool(r.success), "critical": True,
                                    "observed": _observed(r, col)})
            if site is not None:
                from sidrec.data.data_docs import make_offline

                make_offline(site)
    except (DataError, MemoryError):
        raise
    except Exception as e:  # GE internals: one line, no traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"data validation could not run ({type(e).__name__}: {first[:200]})") from None

    return QualityReport(success=all(verdicts), results=results, docs_dir=str(site) if site is not None else None)


def check_config_fits_data(cfg, ds) -> None:
    """Config values that only make sense against the loaded data (the CLI's pre-flight runs this).

    ``index.codebook_size`` above the catalog (or, with a dual index, above the number of users) is
    refused: most of the N new tokens per level would never be used, and ``auto`` sizes it for the
    catalog. ``eval.valid_max_users`` / ``test_max_users`` / ``train.select_users`` above the number of
    users are not errors: they are clipped to every user (README "Configuration")."""
    from sidrec.errors import ConfigError

    n = cfg.index.codebook_size
    if n == "auto":
        return
    families = [("items", len(ds.items))]
    if cfg.index.entities == "items+users":
        families.append(("users", int(ds.sequences["user_id"].nunique())))
    for what, count in families:
        if int(n) > count:
            raise ConfigError(f"index.codebook_size: {n} codes per level for {count} {what} (after filtering) would leave "
                              f"most SID tokens unused; use at most {count} or 'auto'")
