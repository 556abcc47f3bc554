#!/usr/bin/env bash
# Screenshot of the MLflow run page of the newest sidrec training run (its LoggedModel, metrics, datasets),
# as in docs/img/mlflow_run.png (RUN_ID=<id> picks another run). Needs a finished run in the store (e.g. `make smoke`) and chromium.
#   bash docs/screenshot_mlflow.sh [sqlite:///$PWD/.sidrec/mlflow.db] [docs/img/mlflow_run.png]
set -euo pipefail
STORE="${1:-sqlite:///$PWD/.sidrec/mlflow.db}"
OUT="${2:-docs/img/mlflow_run.png}"
PORT="${PORT:-5057}"
export MLFLOW_DISABLE_TELEMETRY=true PATH="$PWD/.venv/bin:$PATH"
read -r EXP RUN < <(.venv/bin/python - "$STORE" <<'PY'
import sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
import os
wanted = os.environ.get("RUN_ID")
if wanted:
    r = mlflow.get_run(wanted)
    print(r.info.experiment_id, r.info.run_id)
    sys.exit(0)
runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`sidrec.model_id` != ''",
                          order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
if not runs:
    sys.exit("no training run with a logged model in " + sys.argv[1])
print(runs[0].info.experiment_id, runs[0].info.run_id)
PY
)
mlflow server --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" >/tmp/sidrec-mlflow-ui.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2600 \
    --virtual-time-budget=20000 --screenshot="$OUT" "http://127.0.0.1:$PORT/#/experiments/$EXP/runs/$RUN"
echo "wrote $OUT (experiment $EXP, run $RUN)"
