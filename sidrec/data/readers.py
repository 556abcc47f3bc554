"""Reading raw interaction, item and user tables (CSV/TSV/Parquet, RecBole atomic files) into clean
pandas frames: ids as strings, timestamps as int64, text columns as stripped strings. Every problem
raises :class:`~sidrec.errors.DataError` with one line naming the file, the column or row, and what to
do about it. :mod:`sidrec.data.dataset` builds the canonical ``Dataset`` from these frames."""
from __future__ import annotations

import csv
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from sidrec.config import REPO_ROOT
from sidrec.errors import DataError

log = logging.getLogger("sidrec.data.dataset")  # the messages users know, under the loader's name


def short_path(path: Path | str) -> str:
    """A path as the user would type it: relative to the repo root when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        return str(p)


def strip_types(columns) -> list[str]:
    """RecBole headers carry `name:type`; keep the name."""
    return [str(c).split(":", 1)[0].strip() for c in columns]


def found_columns(df: pd.DataFrame) -> str:
    return ", ".join(map(str, df.columns)) or "no columns"


def require_column(df: pd.DataFrame, path: Path, col: str, hint: str) -> None:
    if col not in df.columns:
        raise DataError(f"{short_path(path)}: missing column '{col}' (found: {found_columns(df)}){_delimiter_hint(df)}; {hint}")


def read_text_table(path: Path, sep: str, quoting: int = csv.QUOTE_MINIMAL) -> pd.DataFrame:
    """Read a delimited text file with every column as str ('' -> missing) or raise DataError."""
    try:
        df = pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            quoting=quoting,
            encoding="utf-8",
            skipinitialspace=False,
        )
    except FileNotFoundError:
        raise DataError(f"{short_path(path)}: file not found; check data.path") from None
    except IsADirectoryError:
        raise DataError(f"{short_path(path)}: is a folder, expected a file; check data.path") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{short_path(path)}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "re-save the file with UTF-8 encoding"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{short_path(path)}: file is empty; it needs a header row and data rows") from None
    except pd.errors.ParserError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "malformed rows"
        raise DataError(f"{short_path(path)}: cannot parse ({msg}); check the delimiter and quoting") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{short_path(path)}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    df.columns = [str(c).strip() for c in df.columns]
    _check_header(path, sep, quoting)
    return df


def _check_header(path: Path, sep: str, quoting: int) -> None:
    """pandas silently renames a repeated header name to `name.1`: refuse it instead."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=sep, quoting=quoting), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    names = [str(h).split(":", 1)[0].strip() for h in header]
    dups = sorted({n for n in names if n and names.count(n) > 1})
    if dups:
        raise DataError(
            f"{short_path(path)}: header row has duplicate column name(s) {', '.join(repr(d) for d in dups)}; "
            "give every column a distinct name"
        )


def _delimiter_hint(df: pd.DataFrame) -> str:
    """When the whole header landed in one column, the file uses another delimiter."""
    if len(df.columns) != 1:
        return ""
    head = str(df.columns[0])
    for d, name in ((",", "comma"), ("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
        if d in head:
            return (f" (the header looks {name}-separated: .csv files must be comma-separated, "
                    ".tsv/.txt and RecBole files tab-separated)")
    return ""


def read_any(path: Path, what: str) -> pd.DataFrame:
    """CSV / TSV / Parquet by suffix (table format)."""
    if not path.exists():
        raise DataError(f"{short_path(path)}: {what} file not found; check the path in the config")
    if path.is_dir():
        raise DataError(f"{short_path(path)}: is a folder, expected a {what} file (.csv, .tsv or .parquet)")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises many types
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{short_path(path)}: not a readable Parquet file ({first}); re-export it") from None
        df.columns = [str(c).strip() for c in df.columns]
        fractional = [c for c in df.columns if _has_fraction(df[c])]
        for c in df.columns:
            df[c] = _to_str_column(df[c])
        df.attrs["fractional_columns"] = fractional
        return df
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "\t" if suffix in (".tsv", ".txt") else ","
        return read_text_table(path, sep)
    raise DataError(f"{short_path(path)}: unsupported file type '{suffix}'; use .csv, .tsv or .parquet")


def _has_fraction(s: pd.Series) -> bool:
    if not pd.api.types.is_float_dtype(s.dtype):
        return False
    vals = s.to_numpy(dtype="float64", na_value=np.nan)
    vals = vals[np.isfinite(vals)]
    return bool(len(vals)) and not bool(np.all(np.floor(vals) == vals))


def _to_str_column(s: pd.Series) -> pd.Series:
    """Any column as str with missing values kept missing; integral floats lose their '.0'."""
    if pd.api.types.is_float_dtype(s.dtype):
        vals = s.to_numpy(dtype="float64", na_value=np.nan)
        finite = np.isfinite(vals)
        if np.all(np.floor(vals[finite]) == vals[finite]):
            s = s.astype("Int64")
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s  # timestamps are converted later
    out = s.astype(object).where(s.notna(), None)
    return out.map(lambda v: v if v is None or isinstance(v, str) else str(v)).astype("str")


# spellings of "missing" that pandas/Excel/SQL exports write into id columns
_MISSING_ID_TOKENS = frozenset({"nan", "none", "null", "na", "n/a", "<na>", "nat"})


def clean_ids(s: pd.Series) -> pd.Series:
    """Ids as stripped str; '' and NaN-like spellings -> missing; a column of float-exported integers
    ('12.0', written by pandas when the column had a NaN) loses the '.0', as the Parquet reader does."""
    s = s.astype("str").str.strip()
    s = s.where((s != "") & ~s.str.lower().isin(_MISSING_ID_TOKENS), None)
    present = s.dropna()
    if len(present) and present.str.fullmatch(r"-?\d{1,18}\.0+").all():
        s = s.where(s.isna(), s.str.replace(r"\.0+$", "", regex=True))
    return s


def check_ids(ids: pd.Series, raw: pd.Series, path: Path, col: str, fractional: bool) -> None:
    """Every interaction needs a user and an item id: name the first bad row."""
    bad = ids.isna().to_numpy()
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        val = raw.iloc[pos]
        shown = "empty" if val is None or str(val).strip() in ("", "None") else f"{str(val).strip()!r}"
        raise DataError(
            f"{short_path(path)}: row {int(raw.index[pos]) + 2}, column '{col}': missing id ({shown}; {int(bad.sum())} row(s)); "
            "fill in the id or delete the row"
        )
    if fractional:
        frac = ids.str.fullmatch(r"-?\d+\.\d*[1-9]\d*")
        pos = int(np.flatnonzero(frac.to_numpy())[0]) if frac.any() else 0
        raise DataError(
            f"{short_path(path)}: row {int(raw.index[pos]) + 2}, column '{col}': non-integer numeric id {ids.iloc[pos]!r} "
            "(a float column); store ids as integers or strings"
        )


def parse_timestamps(raw: pd.Series, path: Path, col: str) -> pd.Series:
    """Numeric (seconds, or ms/us/ns) or datetime strings -> int64; raises DataError naming the row.

    Negative numbers and times later than tomorrow are refused: they are usually sentinels for
    "unknown" (-1, 9999-12-31, 2**31-1) and would silently move an event to the start or the end of a
    user's sequence, i.e. change the leave-one-out valid/test targets. A column whose values are all
    equal is accepted with a warning (events are then ordered by file row).
    """
    ts, numeric = _parse_timestamps_raw(raw, path, col)
    vals = ts.to_numpy()
    if len(vals):
        neg = vals < 0
        if numeric and neg.any():
            _bad_range(raw, neg, path, col, "negative timestamp", "use Unix seconds >= 0 (is -1 a placeholder for 'unknown'?)")
        scale = 1
        if numeric:
            med = float(np.median(np.abs(vals)))
            scale = 1_000_000_000 if med >= 1e17 else 1_000_000 if med >= 1e14 else 1_000 if med >= 1e11 else 1
        limit = (int(time.time()) + 86_400) * scale
        future = vals > limit
        if future.any():
            _bad_range(raw, future, path, col, "timestamp in the future",
                       "fix the clock/unit or drop the row (is it a placeholder for 'unknown'?)")
        if len(vals) > 1 and (vals == vals[0]).all():
            log.warning("%s: all %d values of column '%s' are equal; events are ordered by file row",
                        short_path(path), len(vals), col)
    return ts


def _bad_range(raw: pd.Series, bad, path: Path, col: str, what: str, fix: str):
    bad = np.asarray(bad)
    pos = int(np.flatnonzero(bad)[0])
    raise DataError(
        f"{short_path(path)}: row {int(raw.index[pos]) + 2}, column '{col}': {what} {str(raw.iloc[pos]).strip()!r} "
        f"({int(bad.sum())} row(s)); {fix}"
    )


def _parse_timestamps_raw(raw: pd.Series, path: Path, col: str) -> tuple[pd.Series, bool]:
    if pd.api.types.is_datetime64_any_dtype(raw.dtype):
        dt = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        bad = dt.isna()
        if bad.any():
            _bad_ts(raw, bad, path, col)
        return ((dt - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64"), False
    if pd.api.types.is_numeric_dtype(raw.dtype):
        num = pd.to_numeric(raw, errors="coerce")
    else:
        s = raw.astype("str").str.strip()
        num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() * 2 >= len(num):  # a numeric column (maybe with a few bad values)
        vals = num.to_numpy(dtype="float64", na_value=np.nan)
        if not np.isfinite(vals).all():
            _bad_ts(raw, ~np.isfinite(vals), path, col)
        return pd.Series(np.floor(vals).astype("int64"), index=raw.index), True
    s = raw.astype("str").str.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt = pd.to_datetime(s, utc=True, errors="coerce")
        if dt.isna().any():
            try:
                dt = pd.to_datetime(s, utc=True, errors="coerce", format="mixed")
            except (ValueError, TypeError):
                pass
    bad = dt.isna()
    if bad.any():
        _bad_ts(raw, bad, path, col)
    return ((dt - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64"), False


def _bad_ts(raw: pd.Series, bad, path: Path, col: str):
    bad = np.asarray(bad)
    pos = int(np.flatnonzero(bad)[0])
    n = int(bad.sum())
    val = raw.iloc[pos]
    line = int(raw.index[pos]) + 2  # header row + 1-based
    val_s = "empty" if val is None or (isinstance(val, float) and np.isnan(val)) or pd.isna(val) else repr(str(val))
    raise DataError(
        f"{short_path(path)}: row {line}, column '{col}': cannot parse timestamp {val_s} ({n} bad value(s)); "
        "use Unix seconds or ISO dates like 2020-01-31 12:00:00"
    )


def _natural_key(ids: pd.Series) -> pd.Series | None:
    """Numeric sort key when every id is a plain integer (so '2' sorts before '10')."""
    if len(ids) and ids.str.fullmatch(r"\d{1,18}").all():
        return ids.astype("int64")
    return None


def sort_ids(ids) -> list[str]:
    s = pd.Series(pd.unique(pd.Series(ids, dtype="str")), dtype="str")
    key = _natural_key(s)
    if key is None:
        return sorted(s.tolist())
    return s.iloc[np.lexsort((s.to_numpy(), key.to_numpy()))].tolist()


def sort_frame_by_id(df: pd.DataFrame, col: str, extra: list[str] | None = None) -> pd.DataFrame:
    """Sort by id (natural order) then `extra` columns, stably."""
    if df.empty:
        return df.reset_index(drop=True)
    order = sort_ids(df[col])
    rank = pd.Series(np.arange(len(order)), index=pd.Index(order, dtype="str"))
    tmp = df.assign(_idrank=df[col].map(rank).to_numpy())
    tmp = tmp.sort_values(["_idrank"] + (extra or []), kind="stable")
    return tmp.drop(columns="_idrank").reset_index(drop=True)


def text_frame(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    out = df.copy()
    for c in cols:
        out[c] = out[c].fillna("").astype("str").str.strip()
    return out
