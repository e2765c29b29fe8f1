# mmnorm: the README's commands.
#   make test                 set up .venv (if needed) and run the test suite
#   make test-fast            the fast tier: layers, functional forms, contract (under 90 s)
#   make lint                 ruff (pinned in requirements/lint.txt, configured in ruff.toml)
#   make demo                 set up .venv (if needed) and run the embedded demo (Mask R-CNN + SN)
#   make demo NORM=BN         ... with another normalizer: SN, SN_tied, SSN, BCN-WS, GN, BN
#                             (group-wise ratios: SN-G4, SN-G16, SSN-G4, SSN-G16)
#   make demo QUICK=1         ... a smoke run of about a minute
#   make demo-seg             the segmentation demo (DeepLabv2 + SN, mIoU)
#   make deploy-seg           its model to ONNX, checked and evaluated with ONNX Runtime
#   make study                what SN and BCN learn, on the digits: ratio and StatDiff studies
#   make docs                 the documentation (Sphinx + MyST, warnings are errors, every link
#                             and cross-reference checked) in docs/_build/html: open index.html
#   make docs-figures         copy the figures of make demo / make study into docs/images
#   make dist                 the sdist and wheel (configs and tools inside, for mim) in dist/
#   make gpu-check            the prepared GPU check (tools/gpu_check.py; torch only, no .venv
#                             needed): JSON + Markdown in work_dirs/gpu_check; fails when a case
#                             failed (its exit status 1) or cases were not run for time (3)
#   make gpu-check DEVICE=cpu ... its short mode on the CPU (CI runs it)
#   make gpu-check-torch      that short mode under the GPU machine's torch (MACHINE_TORCH,
#                             2.11.0), installed beside .venv: the version the GPU check will
#                             meet there (CI runs it)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
NORM ?= SN
DEVICE ?= cuda
# The GPU machine's torch (its image's, last read 2026-11-17), which it cannot change.
MACHINE_TORCH ?= 2.11.0
# The GPU machine has torch but no .venv (no OpenMMLab packages, no network): python3 there.
# gpu_check.py needs torch and mmnorm's core only (mmnorm.testing, nothing from tests/); an
# installed mmnorm runs the same script as `mim run mmnorm gpu_check`.
CHECK_PY := $(if $(wildcard $(PY)),$(PY),python3)
QUICK ?=
DEMO_ARGS := --norm $(NORM) $(if $(QUICK),--quick,)

.PHONY: env test test-fast lint demo demo-seg deploy-seg study benchmark dist docs docs-figures \
	gpu-check gpu-check-torch clean-env

env:
	@VENV=$(VENV) PYTHON=$(PYTHON) bash tools/setup_env.sh

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: env
	$(PY) -m pytest -m fast $(PYTEST_ARGS)

lint: env
	$(PY) -m ruff check .

demo: env
	$(PY) tools/demo.py $(DEMO_ARGS)

demo-seg: env
	$(PY) tools/demo.py --task seg $(if $(QUICK),--quick,)

SEG_CONFIG := configs/demo/deeplabv2_r18-tiny-d8_sn_demo.py
SEG_DIR := work_dirs/demo-seg

deploy-seg: env
	@test -f $(SEG_DIR)/model_batch_average.pth || { echo "run make demo-seg first"; exit 1; }
	$(PY) tools/deploy/export_onnx.py $(SEG_CONFIG) $(SEG_DIR)/model_batch_average.pth \
		$(SEG_DIR)/model.onnx --dynamic-batch --verify --overwrite
	$(PY) tools/deploy/test_onnx.py $(SEG_CONFIG) $(SEG_DIR)/model.onnx \
		--metrics-out $(SEG_DIR)/metrics_onnx.json

study: env
	$(PY) tools/analysis/ratio_study.py --out work_dirs/ratio_study --overwrite
	$(PY) tools/analysis/statdiff_study.py --out work_dirs/statdiff_study --overwrite

benchmark: env
	$(PY) tools/benchmark_norms.py

# The standard build frontend; the environment's setuptools (< 81) builds both, the wheel from the
# sdist, so a file missing from MANIFEST.in fails here.
dist: env
	$(PY) -m build --no-isolation --outdir dist .

# The docs builder (requirements/docs.txt) is installed into $(VENV) when missing; see docs/build.sh.
docs: env
	@VENV=$(VENV) bash docs/build.sh

docs-figures:
	@bash docs/figures.sh

gpu-check:
	$(CHECK_PY) tools/gpu_check.py --device $(DEVICE) --out work_dirs/gpu_check

gpu-check-torch: env
	VENV=$(VENV) bash tools/gpu_check_torch.sh $(MACHINE_TORCH)

clean-env:
	rm -rf $(VENV)
