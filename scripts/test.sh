#!/usr/bin/env bash
# The README's test command: installs what it needs (first run only), then runs the whole CPU suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.build/torch_extensions}"
cd "$ROOT"
exec python -m pytest tests "$@"
