#!/usr/bin/env bash
# Create (or update) the project's virtualenv in .venv and install opqn with its test tools.
# Safe to re-run. torch==2.14.1 / torchvision==0.29.1 come from the machine's local wheels
# where present; elsewhere pip downloads them.
#   --with-browser  also install Debian's chromium + chromium-driver (the viewer test needs them)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--with-browser" ]; then
  bash infra/install_browser.sh
fi
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's exit status decides (pipefail); this machine's find-links notices are filtered out.
pip_install() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pip_install -e '.[test]'
# MTCNN weights ship inside facenet-pytorch's wheel; its metadata pins an old torch, so it is
# installed without dependencies and only its weight files are used.
pip_install --no-deps 'facenet-pytorch==2.6.0'
.venv/bin/python -c "import torch, ray, prefect, faiss, pyarrow, s3fs; import model, storage, pipelines" \
  || { echo "setup: the virtualenv in .venv is incomplete; see the pip output above" >&2; exit 1; }
