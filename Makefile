# wsss-fast — the README's commands. PYTHON may name a virtualenv's interpreter.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test test-all bench bench-report gpu-check demo demo-quick ops-demo pretrain clean

install:  ## pinned dependencies (CPU torch first: never let pip pick a CUDA build), then the build
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIP) install --disable-pip-version-check -q -r requirements.txt
	$(PIP) install --disable-pip-version-check -q --no-build-isolation -e .

test: install  ## the test suite (Triton faces in the interpreter; GPU tests skip without a GPU)
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q -m "not slow" --durations=10

test-all: install
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q

bench: install  ## pytest-benchmark suites (full-size cases; minutes)
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-group-by=group -q

bench-report: install  ## one table of side-by-side ratios with peak memory
	$(PYTHON) -m benchmarks.report

gpu-check: install  ## on a CUDA machine (<= 8 min): nvcc build, gpu tests, GPU benchmarks -> benchmarks/results/gpu/report.md
	$(PYTHON) -m benchmarks.gpu_check

demo: install  ## the pipeline on the synthetic benchmark, every method trained from the shipped backbones, rows two at a time (~21 min on 2 cores; benchmarks/results/demo_full)
	$(PYTHON) -m wsss_fast demo --out demo_out

# The shipped backbones (pretrained/*.pt, manifest pretrained/MANIFEST.json): one pretraining run
# per family on the procedural source domain; PRETRAIN_FLAGS adds options (e.g. --overwrite).
PRETRAIN = $(PYTHON) -m wsss_fast pretrain --seed 0 --threads 1 --quiet $(PRETRAIN_FLAGS)
pretrain: install  ## the four tiny backbones on the source domain (~25 min, 2 cores)
	$(PRETRAIN) --family vit --steps 200 --out pretrained/vit.pt
	$(PRETRAIN) --family resnet --steps 1500 --warmup-steps 100 --out pretrained/resnet.pt
	$(PRETRAIN) --family conformer --steps 300 --lr 5e-4 --warmup-steps 100 --out pretrained/conformer.pt
	$(PRETRAIN) --family resnet38 --steps 1500 --warmup-steps 100 --out pretrained/resnet38.pt
	$(PYTHON) -c "from wsss_fast.train.pretrain import write_manifest; write_manifest('pretrained')"

demo-quick: install  ## the same at a smoke-test size (48 images, 2 epochs: CI)
	$(PYTHON) -m wsss_fast demo --quick --out demo_quick

ops-demo: install  ## the ops on a ViT-S-sized case: every face checked against the reference, timed
	$(PYTHON) examples/ops_demo.py

clean:
	rm -rf build *.egg-info wsss_fast/*.so .pytest_cache .benchmarks demo_quick demo_out
