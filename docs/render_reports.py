"""Render the data-quality and drift pages of README's screenshots from real MovieLens-100k data: the
'previous run' is the first 800 users, the current run all 943 (as a retrain on appended users sees it).

    .venv/bin/python docs/render_reports.py /tmp/pages
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,2480 \
        --screenshot=docs/img/data_quality.png file:///tmp/pages/data_quality.html   # drift: 1200,1040
    # the Great Expectations Data Docs site with both validation runs (file Data Context in /tmp/pages/state):
    chromium ... --window-size=1400,900 --screenshot=docs/img/data_docs.png \
        file:///tmp/pages/state/gx/uncommitted/data_docs/sidrec_data_docs/index.html
"""
import sys
from pathlib import Path
from sidrec.config import DataConfig, ValidationConfig
from sidrec.data.dataset import load_dataset
from sidrec.data.profile import ProfileHistory, profile_dataset
from sidrec.data.validation import validate_dataset
from sidrec.ops.drift import compare, report_html
from sidrec.ops.logged_model import data_profile
from sidrec.ops.reports import quality_html

out = Path(sys.argv[1])
old = load_dataset(DataConfig(format="recbole", path="data/ml-100k", max_users=800))
new = load_dataset(DataConfig(format="recbole", path="data/ml-100k"))
prev = profile_dataset(old)
prev["created"] = "2026-11-24 03:00:00"
validate_dataset(old, ValidationConfig(), out / "state")  # the previous run, in the same file Data Context
rep = validate_dataset(new, ValidationConfig(), out / "state")
rep.profile, rep.previous = profile_dataset(new), prev
(out / "data_quality.html").write_text(quality_html(rep))
champ = data_profile(old)
champ["model_version"] = "3"
(out / "drift_report.html").write_text(report_html(compare(champ, data_profile(new))))
print("ok")
