# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
SAMPLE_MODEL := samples/vantgan_phantom3d.safetensors
SAMPLE_SCAN := samples/phantom_atrophy.nii.gz
DEMO_OUT ?= demo_out

.PHONY: setup demo test sample benchmark

# torch first, and only when missing: Slicer and GPU users bring their own build; here 2.13.0 is the CPU wheel.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[training,phantom,research,slicer,test]"

demo: setup
	$(PYTHON) -m CounterfactualVACLI attribute --model $(SAMPLE_MODEL) --input $(SAMPLE_SCAN) --out $(DEMO_OUT)
	@echo "Outputs in $(DEMO_OUT)/ (open phantom_atrophy_figure.png; summary.json has timings)"

test: setup
	$(PYTHON) -X faulthandler -m pytest -q

# Rebuild the shipped sample (phantom scan + VANT-GAN model); see samples/README.md for the recorded command.
sample: setup
	$(PYTHON) benchmarks/make_sample.py

benchmark: setup
	$(PYTHON) benchmarks/attribution_benchmark.py
