#!/usr/bin/env bash
# `make docs`: build the documentation into docs/_build/html with the project's environment.
#   1. the docs builder (requirements/docs.txt, pinned in requirements/constraints.txt) goes into
#      $VENV when it is missing or not the pinned version (a check of about a second otherwise);
#   2. sphinx-build from a fresh environment (-E: every page is read again, so no warning hides
#      in an unchanged page), warnings as errors (-W, --keep-going to list them all), nitpicky
#      (-n: every cross-reference, page link and heading anchor must resolve);
#   3. the page count and the warning count.
# VENV=... (default .venv) names the environment; make docs runs make env first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OUT=${DOCS_OUT:-docs/_build/html}
[ -x "$PY" ] || { echo "[mmnorm docs] no $PY: run make env first" >&2; exit 1; }

# Installed and pinned? (The pins of requirements/docs.txt's packages in constraints.txt.)
docs_env_ok() {
    "$PY" - <<'EOF' 2>/dev/null
import re
from importlib.metadata import version
names = [line.split('#')[0].strip() for line in open('requirements/docs.txt')]
pins = dict(re.findall(r'^([A-Za-z0-9_.-]+)==(\S+)', open('requirements/constraints.txt').read(), re.M))
for name in filter(None, names):
    assert version(name) == pins.get(name, version(name)), name
import myst_parser, furo, sphinxarg, sphinx  # noqa: F401,E401
EOF
}
if ! docs_env_ok; then
    echo "[mmnorm docs] installing the docs builder (requirements/docs.txt) into $VENV"
    "$PY" -m pip install --progress-bar off -c requirements/constraints.txt -r requirements/docs.txt
fi

start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
"$PY" -m sphinx -E -W --keep-going -n -b html docs "$OUT" 2>&1 | tee "$log" || status=$?
warnings=$(grep -c -E '(WARNING|ERROR|CRITICAL):' "$log" || true)
pages=$(sed -n 's/^\[mmnorm docs\] \([0-9]*\) pages built.*/\1/p' "$log" | tail -1)
if [ "$status" -ne 0 ]; then
    echo "[mmnorm docs] FAILED: $warnings warning(s)/error(s) above (warnings are errors)" >&2
    exit "$status"
fi
echo "[mmnorm docs] $pages pages, $warnings warnings, $(( $(date +%s) - start )) s:" \
     "open $OUT/index.html"
