"""Scheduled retraining: cron + flock on one machine (the local ZenML orchestrator has no schedules),
or a ZenML ``Schedule`` on an orchestrator that runs them (``run.py schedule --zenml``, e.g. Kubeflow).

`run.py schedule --config C [--cron "0 3 * * 1"] [--install]` prints (or installs) one crontab line:

    0 3 * * 1 cd /repo && flock -n /repo/.sidrec/retrain.lock .venv/bin/python run.py retrain --config C >> .sidrec/logs/retrain.log 2>&1  # sidrec-retrain:C

``flock -n`` makes a run that finds the previous one still going exit at once, so two retrainings
never overlap. Installing replaces an existing line for the same config (matched by the trailing
``# sidrec-retrain:<config>`` marker) and leaves every other crontab line alone.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from sidrec.errors import ConfigError

MARKER = "# sidrec-retrain:"


def validate_cron(expr: str) -> str:
    fields = expr.split()
    if len(fields) != 5 and not (len(fields) == 1 and fields[0].startswith("@")):
        raise ConfigError(f"--cron: {expr!r} is not a 5-field cron expression (minute hour day month weekday), e.g. '0 3 * * 1'")
    allowed = set("0123456789*/,-")
    for f in fields if len(fields) == 5 else []:
        if not set(f) <= allowed | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"):
            raise ConfigError(f"--cron: field {f!r} has characters cron does not accept")
    return " ".join(fields)


# orchestrator flavors whose schedules take a 6-field cron (seconds first): Kubeflow Pipelines parses
# recurring runs with robfig/cron (kfp.Client.create_recurring_run: "6 space-separated fields") and
# ZenML passes Schedule.cron_expression through unchanged
SIX_FIELD_FLAVORS = {"kubeflow"}
# flavors without schedule support (ZenML docs, "Schedule a pipeline")
NO_SCHEDULES = {"local", "local_docker"}


def orchestrator_cron(expr: str, flavor: str) -> str:
    """The cron expression a ZenML ``Schedule`` needs on orchestrator ``flavor``: the 5-field crontab form
    (as ``--cron`` takes it), with a leading seconds field ``0`` for Kubeflow. ``ConfigError`` for an
    orchestrator that cannot run schedules."""
    if flavor in NO_SCHEDULES:
        raise ConfigError(f"--zenml: the active stack's orchestrator ({flavor}) does not run schedules; use the crontab "
                          "line (run.py schedule without --zenml) or a stack with a Kubeflow orchestrator "
                          "(infra/kubeflow/register_stack.sh)")
    fields = validate_cron(expr).split()
    if fields[0].startswith("@"):
        return fields[0]
    return " ".join(["0", *fields]) if flavor in SIX_FIELD_FLAVORS else " ".join(fields)


def cron_line(config: str, cron: str, repo: Path, python: Optional[str] = None, lock_file: Optional[str] = None,
              log_file: Optional[str] = None) -> str:
    repo = Path(repo).resolve()
    cfg = str(Path(config).resolve()) if Path(config).exists() else config
    python = python or (str(repo / ".venv" / "bin" / "python") if (repo / ".venv" / "bin" / "python").exists() else sys.executable)
    from sidrec.runtime import state_home

    home = state_home()
    lock = lock_file or str(home / "retrain.lock")
    log = log_file or str(home / "logs" / "retrain.log")
    cmd = (f"cd {shlex.quote(str(repo))} && mkdir -p {shlex.quote(str(Path(log).parent))} && "
           f"flock -n {shlex.quote(lock)} {shlex.quote(python)} run.py retrain --config {shlex.quote(cfg)} "
           f">> {shlex.quote(log)} 2>&1")
    return f"{validate_cron(cron)} {cmd}  {MARKER}{cfg}"


def merge_crontab(existing: str, line: str) -> str:
    """``existing`` crontab text with ``line`` added, replacing a line with the same marker."""
    marker = line[line.index(MARKER):]
    kept = [l for l in existing.splitlines() if not l.rstrip().endswith(marker)]
    return "\n".join([*kept, line]) + "\n"


def install(line: str) -> str:
    """Install into the current user's crontab (``crontab -l`` / ``crontab -``); returns the new table."""
    try:
        cur = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("--install: the `crontab` command is not available on this machine; add the printed line yourself") from None
    table = merge_crontab(cur.stdout if cur.returncode == 0 else "", line)
    out = subprocess.run(["crontab", "-"], input=table, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"--install: crontab refused the table: {out.stderr.strip()[:200]}")
    return table
