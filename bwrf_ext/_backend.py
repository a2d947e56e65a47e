"""Loads the compiled op library, or falls back to the pure-PyTorch reference with one warning."""

from __future__ import annotations

import importlib
import os
import platform
import re
import warnings

import torch

FORCE_REFERENCE_ENV = "BWRF_EXT_FORCE_REFERENCE"
REBUILD_COMMAND = "pip install --no-build-isolation -e ."


def _load_compiled():
    """Imports bwrf_ext._C (which registers the ops) unless the reference is forced.

    Returns:
        The module, or None when it is absent, fails to load, or the env switch forces the
        reference. The reason is kept in ``load_error``.
    """
    if os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0"):
        return None, f"{FORCE_REFERENCE_ENV}=1 forces the pure-PyTorch reference"
    try:
        module = importlib.import_module("bwrf_ext._C")  # registers torch.ops.bwrf_ext.*
    except ImportError as e:
        warnings.warn(
            f"bwrf_ext: the compiled ops could not be loaded ({e}); using the pure-PyTorch "
            f"reference, which is correct but slower. Rebuild with: {REBUILD_COMMAND}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, str(e)
    return module, None


compiled, load_error = _load_compiled()


def build_info() -> dict:
    """What this installation of bwrf_ext runs on.

    Returns:
        A dict with ``backend`` ("compiled" or "reference"), ``cpu_kernels`` and ``cuda_kernels``
        (bools), ``cuda_archs`` (the list the CUDA kernels were built for), ``cuda_available``
        (a usable GPU now), ``torch`` (the running torch version), ``built_with_torch``, and
        ``reason`` (why the reference is used, else None).
    """
    info = {
        "backend": "compiled" if compiled is not None else "reference",
        "cpu_kernels": False,
        "cuda_kernels": False,
        "cuda_archs": [],
        "built_with_torch": None,
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "reason": load_error,
    }
    if compiled is not None:
        info.update(compiled.build_info())
    return info


def describe_device(device: torch.device) -> tuple[str, str]:
    """(file-name tag, human description) of the device, e.g. ("cpu-2core", "AMD EPYC")."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(s.split(":", 1)[1].strip() for s in f if s.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu-{len(os.sched_getaffinity(0))}core", model
