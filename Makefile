# The README's two commands, `make test` and `make demo`, each set everything up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export MAX_JOBS ?= 2
CMAKE_BUILD ?= build-cmake

.PHONY: test demo install cmake-lib bench lint clean

# Dependencies, reinstalled when requirements-dev.txt changes.
$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements-dev.txt
	touch $@

# The package with its compiled ops (CUDA kernels too wherever nvcc is found), rebuilt only when
# the C++/CUDA sources or the build script change (a full build takes minutes).
install: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(shell find csrc -type f)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import bwrf_ext, json; print(json.dumps(bwrf_ext.build_info()))"
	touch $@

# The same csrc/ built by CMake against libtorch, so that build cannot rot.
cmake-lib: $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)

test: install cmake-lib
	BWRF_EXT_CMAKE_LIB=$(abspath $(CMAKE_BUILD))/libbwrf_ext_ops.so $(PY) -m pytest python_tests -q
	@echo "== CPU fallback: the op and layer tests again on the pure-PyTorch reference =="
	BWRF_EXT_FORCE_REFERENCE=1 $(PY) -m pytest python_tests/test_ops.py python_tests/test_layers.py -q
	@echo "== benchmarks, quick mode (each case once) =="
	$(PY) -m pytest benchmarks --benchmark-disable -q

demo: install
	$(PY) -m bwrf_ext.demo

bench: install
	$(PY) -m benchmarks.perf.lsq_ratios

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check bwrf_ext python_tests benchmarks setup.py

clean:
	rm -rf build $(CMAKE_BUILD) bwrf_ext/_C*.so *.egg-info $(VENV)/.built
