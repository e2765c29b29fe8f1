#!/usr/bin/env bash
# Sourced by the launch scripts: sets PYTHON to the interpreter to run mmnorm's tools with.
#   1. $PYTHON, when set (an explicit choice always wins);
#   2. the project's environment, <repo>/.venv/bin/python, when it exists (make test / make demo
#      create it), so the scripts work without activating it;
#   3. python (else python3) on PATH.
_mmnorm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$_mmnorm_root/.venv/bin/python" ]; then
        PYTHON="$_mmnorm_root/.venv/bin/python"
    elif command -v python >/dev/null 2>&1; then
        PYTHON=python
    else
        PYTHON=python3
    fi
fi
export PYTHON
