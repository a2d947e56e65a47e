"""How bwrf_ext loads: the compiled module, the warned fallback without it, the forced fallback."""

import json
import os
import subprocess
import sys

import bwrf_ext

# Imports bwrf_ext in a fresh process with the compiled module made unimportable (as on a
# machine without a compiler) and reports the warnings, build_info() and whether the op works.
PROBE = r"""
import importlib.abc, json, sys, warnings

class NoCompiledModule(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bwrf_ext._C" and "--block" in sys.argv:
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, NoCompiledModule())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import bwrf_ext
    from bwrf_ext import reference
x, s = torch.randn(4, 5), torch.tensor([0.25])
y = bwrf_ext.lsq_fake_quant(x, s, -2, 1, 1.0)
works = torch.equal(y, reference.lsq_fake_quant(x, s, -2, 1))
messages = [str(w.message) for w in caught if "bwrf_ext" in str(w.message)]
print(json.dumps({"warnings": messages, "info": bwrf_ext.build_info(), "works": works}))
"""


def run_probe(*args: str, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env={**os.environ, **env}, capture_output=True,
        text=True, timeout=300, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_build_info_describes_this_installation():
    info = bwrf_ext.build_info()
    assert info["backend"] in ("compiled", "reference")
    assert set(info) >= {"cpu_kernels", "cuda_kernels", "cuda_archs", "torch", "reason"}
    if info["backend"] == "compiled":
        assert info["cpu_kernels"] and info["reason"] is None
        assert info["cuda_kernels"] == bool(info["cuda_archs"])


def test_missing_compiled_module_warns_once_and_falls_back():
    probe = run_probe("--block", BWRF_EXT_FORCE_REFERENCE="0")
    assert len(probe["warnings"]) == 1
    assert "pip install --no-build-isolation -e ." in probe["warnings"][0]
    assert probe["info"]["backend"] == "reference"
    assert "blocked by the test" in probe["info"]["reason"]
    assert probe["works"]


def test_env_switch_forces_the_reference_silently():
    probe = run_probe(BWRF_EXT_FORCE_REFERENCE="1")
    assert probe["warnings"] == []
    assert probe["info"]["backend"] == "reference"
    assert "BWRF_EXT_FORCE_REFERENCE" in probe["info"]["reason"]
    assert probe["works"]
