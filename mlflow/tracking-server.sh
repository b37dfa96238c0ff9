#!/usr/bin/env bash
# Start, stop or check the shared MLflow tracking server: mlflow/tracking-server.sh start|stop|status
# Settings: mlflow/server.env (each can be overridden from the environment). See docs/cluster.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=server.env
source "$here/server.env"
action="${1:-status}"
if [[ "$MSAE_MLFLOW_BACKEND_URI" == sqlite:///* ]]; then
    mkdir -p "$(dirname "${MSAE_MLFLOW_BACKEND_URI#sqlite:///}")"
fi
exec msae tracking-server "$action" --backend-uri "$MSAE_MLFLOW_BACKEND_URI" --artifacts "$MSAE_MLFLOW_ARTIFACTS" \
    --host "$MSAE_MLFLOW_HOST" --port "$MSAE_MLFLOW_PORT" --state-dir "$MSAE_MLFLOW_STATE_DIR"
