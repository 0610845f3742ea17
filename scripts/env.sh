# Sourced by scripts/serve.sh and scripts/test.sh: create .venv and install the project (with its
# test extra) pinned by constraints.txt. Re-installs only when pyproject.toml or constraints.txt change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.loss-service-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "loss-service: installing dependencies into .venv (first run only)..." >&2
  python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 >&2
  python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]" >&2
  echo "$want" > "$stamp"
fi
