#!/usr/bin/env bash
# Create (if missing) and fill the repository's virtual environment with the full, tested stack:
#   torch 2.13.0 + torchvision 0.28.0 (registry builds) -> mmcv 2.1.0 built with its ops -> mmdet,
#   mmsegmentation, mmpretrain -> mmnorm (editable), the test tools and the docs builder.
#
# Idempotent: a fingerprint of the requirement files is stored in the venv; when it matches and the
# stack imports, nothing is installed. Used by `make test` / `make demo`; safe to run by hand.
#
# Environment knobs:
#   VENV=.venv          where the environment lives
#   PYTHON=python3      interpreter used to create it (>= 3.10; tested: 3.11)
#   MAX_JOBS=<nproc>    parallel compile jobs for the mmcv build
#   MMNORM_MMCV_CUDA=auto   mmcv's CUDA ops: auto = when torch is a CUDA build, nvcc is on PATH
#                       (or in CUDA_HOME) and torch sees a GPU; 1 / 0 force them on / off
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PY="$VENV/bin/python"
CONSTRAINTS=requirements/constraints.txt
STAMP="$VENV/.mmnorm-env"

say() {
    if [ -n "${start:-}" ]; then  # elapsed time, so a slow step shows where the minutes go
        printf '[mmnorm setup] (%4d s) %s\n' "$(( $(date +%s) - start ))" "$*"
    else
        printf '[mmnorm setup] %s\n' "$*"
    fi
}
die() { printf '[mmnorm setup] ERROR: %s\n' "$*" >&2; exit 1; }
pip_install() { "$PY" -m pip install --progress-bar off -c "$CONSTRAINTS" "$@"; }

fingerprint() {
    cat requirements/*.txt setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1
}

# The whole stack must import, including the compiled ops of torchvision and mmcv.
stack_ok() {
    "$PY" - <<'EOF' 2>/dev/null
import torch, torchvision
from torchvision.ops import nms
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
import mmcv
from mmcv.ops import nms as mmcv_nms  # noqa: F401  (needs mmcv._ext)
import mmdet, mmseg, mmpretrain, mmnorm  # noqa: F401,E401
import mim  # noqa: F401  (openmim, for the mim route)
EOF
}

if [ ! -x "$PY" ]; then
    command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python3.11"
    say "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

want=$(fingerprint)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && stack_ok; then
    say "environment $VENV is up to date"
    exit 0
fi
rm -f "$STAMP"
start=$(date +%s)

say "step 1/5: build tools for mmcv (requirements/build.txt)"
pip_install -r requirements/build.txt

say "step 2/5: torch 2.13.0 + torchvision 0.28.0 from the package registry"
pip_install torch torchvision
"$PY" - <<'EOF' || die "torchvision's compiled ops do not load with this torch (mismatched pair?)"
import torch, torchvision
from torchvision.ops import nms
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print(f'[mmnorm setup] torch {torch.__version__}, torchvision {torchvision.__version__}: ops load')
EOF

# mmcv's ops for the device: CUDA kernels (RoIAlign, NMS, ... on GPUs) when torch is a CUDA
# build, nvcc is there and torch sees a GPU; else C++ only. MMNORM_MMCV_CUDA=1 / 0 forces it
# (building the CUDA kernels takes about an hour on 2 cores: not done on a machine without a GPU
# unless asked for).
want_cuda() {
    case "${MMNORM_MMCV_CUDA:-auto}" in
        1|true|yes) return 0 ;;
        0|false|no) return 1 ;;
    esac
    command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || return 1
    "$PY" -c 'import sys, torch; sys.exit(not (torch.version.cuda and torch.cuda.is_available()))'
}
# 'cuda <version>', 'cpu', or nothing when mmcv 2.1.0's ops do not import.
mmcv_ops() {
    "$PY" - <<'EOF' 2>/dev/null
import mmcv
from mmcv.ops import get_compiling_cuda_version, nms  # noqa: F401  (needs mmcv._ext)
assert mmcv.__version__ == '2.1.0'
version = get_compiling_cuda_version()
print('cpu' if version == 'not available' else f'cuda {version}')
EOF
}
if want_cuda; then wanted=cuda; else wanted=cpu; fi
have=$(mmcv_ops || true)
if [ -n "$have" ] && { [ "$wanted" = cpu ] || [ "${have%% *}" = cuda ]; }; then
    say "step 3/5: mmcv 2.1.0 with ops already installed ($have ops)"
else
    jobs=${MAX_JOBS:-$(nproc)}
    # Python's CFLAGS carry -g: debug info for ~170 sources that include torch's headers doubles
    # the compile time (measured 25 s -> 13 s for one file) and is no use in a wheel. -g0 last wins.
    cflags="${CFLAGS:-$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("CFLAGS") or "")')} -g0"
    export CFLAGS="$cflags"
    if [ "$wanted" = cuda ]; then
        # pip's wheel cache does not tell a CPU-only wheel of mmcv 2.1.0 from a CUDA one: skip it.
        say "step 3/5: building mmcv 2.1.0 with its CUDA and C++ ops from source (torch CUDA $("$PY" -c 'import torch; print(torch.version.cuda)'); about an hour on 2 cores)"
        FORCE_CUDA=1 MMCV_WITH_OPS=1 MAX_JOBS=$jobs pip_install --no-build-isolation --no-cache-dir \
            --force-reinstall --no-deps mmcv==2.1.0
    else
        if [ "${MMNORM_MMCV_CUDA:-auto}" = auto ]; then
            why="no GPU, CUDA torch or nvcc here; MMNORM_MMCV_CUDA=1 forces them"
        else
            why="MMNORM_MMCV_CUDA=${MMNORM_MMCV_CUDA}"
        fi
        say "step 3/5: building mmcv 2.1.0 with its C++ ops from source, no CUDA ops ($why; about 10 min on 2 cores; pip caches the wheel)"
        MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$jobs pip_install --no-build-isolation mmcv==2.1.0
        if [ -z "$(mmcv_ops || true)" ]; then
            # A wheel cached from a build against another torch fails with undefined symbols.
            say "mmcv ops do not load (stale cached wheel?); rebuilding without the cache"
            MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$jobs pip_install --no-build-isolation \
                --no-cache-dir --force-reinstall --no-deps mmcv==2.1.0
        fi
    fi
    have=$(mmcv_ops || true)
    [ -n "$have" ] || die "mmcv 2.1.0 ops do not import; see the build log above"
    [ "$wanted" = cpu ] || [ "${have%% *}" = cuda ] \
        || die "mmcv 2.1.0 was built without its CUDA ops although they were asked for (nvcc, CUDA_HOME?)"
    say "mmcv 2.1.0 built with $have ops"
fi

say "step 4/5: mmdet, mmsegmentation, mmpretrain, test, deploy, lint, analysis, packaging and docs tools"
pip_install -r requirements/mminstall.txt -r requirements/tests.txt -r requirements/deploy.txt \
    -r requirements/lint.txt -r requirements/analysis.txt -r requirements/dist.txt \
    -r requirements/docs.txt
# openmim without its requirement opendatalab (-> openxlab, which pins setuptools 60 and old
# requests / tqdm / filelock): mim never imports it; requirements/dist.txt lists what it does.
pip_install --no-deps openmim

say "step 5/5: mmnorm itself (editable)"
pip_install --no-build-isolation --no-deps -e .

stack_ok || die "the installed stack does not import; run: $PY -c 'import mmcv.ops, mmdet, mmseg, mmpretrain, mmnorm'"
fingerprint > "$STAMP"
say "done: $("$PY" -c 'import torch, mmcv, mmdet, mmseg, mmpretrain, mmnorm as m; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}, mmnorm {m.__version__}")')"
