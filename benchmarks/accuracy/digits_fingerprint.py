"""Bit-for-bit fingerprints of a ``bwrf-train`` digits run of every method, to show a refactor
changes no behaviour.

Usage: ``python -m benchmarks.accuracy.digits_fingerprint [--out FILE] [--check FILE]``.

Trains, on scikit-learn's digits (seconds each, one thread, seed 0): the FP small CNN, then LSQ,
BWRF and Block-KD (W2A2) from it, and ContSup (ResNet-20, K=3 with context R1; K=2 with E and
the decoder). Each run's fingerprint is the sha256 of every tensor it saved (the model, the
trainable wrapper, the optimizer state, the RNG state) and its metrics without the wall-clock
fields. ``--out`` writes them as JSON; ``--check`` compares with an earlier file and exits 1
naming each run that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RUNS = {  # name -> bwrf-train options; "{fp}" is the FP run's directory
    "fp": ["--method", "fp", "--epochs", "2"],
    "lsq": ["--method", "lsq", "--w-bits", "2", "--a-bits", "2", "--init-from", "{fp}"],
    "bwrf": ["--method", "bwrf", "--w-bits", "2", "--a-bits", "2", "--init-from", "{fp}"],
    "blockkd": ["--method", "blockkd", "--w-bits", "2", "--a-bits", "2", "--teacher-model",
                "small_cnn", "--teacher-from", "{fp}"],
    "contsup_r1": ["--method", "contsup", "--model", "resnet20", "--contsup-k", "3",
                   "--contsup-context", "R1"],
    "contsup_e_decoder": ["--method", "contsup", "--model", "resnet20", "--contsup-k", "2",
                          "--contsup-context", "E", "--contsup-reconstruction"],
}  # fmt: skip
TIMING_FIELDS = ("train_s",)


def tensor_digest(obj, digest) -> None:
    """Feeds every tensor of a nested checkpoint object, in a fixed order, into ``digest``."""
    if isinstance(obj, torch.Tensor):
        digest.update(str((obj.dtype, tuple(obj.shape))).encode())
        digest.update(obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            digest.update(str(key).encode())
            tensor_digest(obj[key], digest)
    elif isinstance(obj, list | tuple):
        for item in obj:
            tensor_digest(item, digest)


def fingerprint(out: Path) -> dict:
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    digest = hashlib.sha256()
    for part in ("model", "trainable", "partner", "optimizer", "rng"):
        digest.update(part.encode())
        tensor_digest(ckpt.get(part), digest)
    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return {"tensors_sha256": digest.hexdigest(), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the fingerprints here")
    parser.add_argument("--check", type=Path, default=None, help="compare with this file")
    args = parser.parse_args(argv)
    prints = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir = Path(tmp) / "fp"
        for name, options in RUNS.items():
            out = Path(tmp) / name
            options = [o.replace("{fp}", str(fp_dir)) for o in options]
            command = [sys.executable, "-m", "bwrf_ext.train", *options, "--seed", "0",
                       "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{name}: bwrf-train failed ({result.returncode})")
            prints[name] = fingerprint(out)
            last = prints[name]["metrics"][-1]
            print(f"{name}: {prints[name]['tensors_sha256'][:16]} acc {last['acc']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(prints, indent=1) + "\n")
    if args.check:
        before = json.loads(args.check.read_text())
        differ = [name for name in RUNS if before.get(name) != prints[name]]
        print("identical to " + str(args.check) if not differ else f"DIFFERENT: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
