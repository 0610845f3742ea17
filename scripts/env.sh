# Sourced by scripts/serve.sh and scripts/test.sh: create .venv and install the project (with its
# test extra) pinned by constraints.txt, one line per step and per package on stderr. Re-installs
# only when pyproject.toml or constraints.txt change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP=".venv/.loss-service-installed"
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)"

say() { printf 'loss-service: %s\n' "$*" >&2; }

# pip install, showing the packages it collects and installs; its whole output is kept in
# .venv/pip.log and shown when it fails.
pip_install() {
  local line
  if ! python -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 | tee -a .venv/pip.log \
      | while IFS= read -r line; do
          case "$line" in
            Collecting*|"Installing collected packages:"*) say "    $line" ;;
          esac
        done; then
    say "pip failed; the end of .venv/pip.log:"
    tail -n 40 .venv/pip.log >&2
    return 1
  fi
}

install_project() {
  local total=4 started=$SECONDS
  if [ -x .venv/bin/python ]; then
    say "pyproject.toml or constraints.txt changed since .venv was installed: updating it"
    say "[1/$total] .venv is there"
  else
    say "first run: installing into .venv, pinned by constraints.txt (later runs skip this)"
    say "[1/$total] creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  : > .venv/pip.log
  say "[2/$total] upgrading pip"
  pip_install --upgrade pip
  say "[3/$total] torch $TORCH_VERSION, CPU wheel ($((SECONDS - started)) s so far)"
  pip_install -c constraints.txt "torch==$TORCH_VERSION"
  say "[4/$total] loss-service with its server and test dependencies ($((SECONDS - started)) s so far)"
  # The CPU and the CUDA ONNX Runtime write the same module: never both in one environment.
  if python -m pip show --quiet onnxruntime-gpu >/dev/null 2>&1; then
    python -m pip uninstall --yes --quiet onnxruntime-gpu >&2
  fi
  pip_install -c constraints.txt -e ".[test]"
  echo "$WANT" > "$STAMP"
  say "installed in $((SECONDS - started)) s"
}

if [ ! -x .venv/bin/python ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  install_project
fi
# shellcheck disable=SC1091
. .venv/bin/activate
