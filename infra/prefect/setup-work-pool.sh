#!/usr/bin/env bash
# Create the opqn process work pool (if missing) and register every deployment in prefect.yaml.
# See docs/operations.md. Safe to re-run: deployments are updated in place.
#
#   export PREFECT_API_URL=http://prefect.example.internal:4200/api
#   export OPQN_NIGHTLY_MODEL=s3://bucket/models/opqn.pt \
#          OPQN_NIGHTLY_DATASET=s3://bucket/faces OPQN_NIGHTLY_GALLERY=s3://bucket/gallery
#   bash infra/prefect/setup-work-pool.sh
#
# Settings (environment):
#   PREFECT_API_URL        the Prefect server (or set it in the active Prefect profile)
#   OPQN_WORK_POOL         work pool name (default: opqn)
#   OPQN_REPO_DIR          this repository's path on the machine where the worker runs
#                          (default: this checkout); flow runs start in that folder
#   OPQN_NIGHTLY_MODEL, OPQN_NIGHTLY_DATASET, OPQN_NIGHTLY_GALLERY
#                          parameters of encode-gallery-nightly (required)
#   PREFECT                the prefect command (default: .venv/bin/prefect, else prefect on PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO_ROOT="$(pwd -P)"

if [ -z "${PREFECT:-}" ]; then
  if [ -x .venv/bin/prefect ]; then PREFECT=.venv/bin/prefect; else PREFECT=prefect; fi
fi
export OPQN_WORK_POOL="${OPQN_WORK_POOL:-opqn}"
export OPQN_REPO_DIR="${OPQN_REPO_DIR:-$REPO_ROOT}"

missing=()
for var in OPQN_NIGHTLY_MODEL OPQN_NIGHTLY_DATASET OPQN_NIGHTLY_GALLERY; do
  [ -n "${!var:-}" ] || missing+=("$var")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-work-pool: set ${missing[*]} (the nightly encode's model, dataset and gallery URLs)" >&2
  exit 2
fi
export OPQN_NIGHTLY_MODEL OPQN_NIGHTLY_DATASET OPQN_NIGHTLY_GALLERY

if [ -z "${PREFECT_API_URL:-}" ] \
   && ! grep -q '^PREFECT_API_URL=' <<<"$("$PREFECT" config view 2>/dev/null || true)"; then
  echo "setup-work-pool: set PREFECT_API_URL to your Prefect server (e.g. http://HOST:4200/api)" >&2
  exit 2
fi

if "$PREFECT" --no-prompt work-pool inspect "$OPQN_WORK_POOL" >/dev/null 2>&1; then
  echo "work pool $OPQN_WORK_POOL exists"
else
  "$PREFECT" --no-prompt work-pool create "$OPQN_WORK_POOL" --type process
fi

"$PREFECT" --no-prompt deploy --all

cat <<EOF

Deployments registered on work pool $OPQN_WORK_POOL (flow runs start in $OPQN_REPO_DIR).
Start a worker on a machine that has this repository at $OPQN_REPO_DIR, is a node of the Ray
cluster (or reaches it) and has the S3 settings, e.g. on the Ray head node:

  set -a; . ~/.opqn/s3.env; set +a            # AWS_* (on cluster nodes: . ~/opqn-env.sh)
  export PREFECT_API_URL=${PREFECT_API_URL:-http://HOST:4200/api}
  export RAY_ADDRESS=auto                     # the Ray cluster this machine belongs to
  cd $OPQN_REPO_DIR && .venv/bin/prefect worker start --pool $OPQN_WORK_POOL

Then: prefect deployment run train-opqn/train-opqn --param dataset=... --param model_url=...
EOF
