"""Peak activation memory of a ContSup training step on ResNet-32: end-to-end vs K modules.

Usage: ``python -m benchmarks.perf.contsup_memory [--device cpu|cuda] [--quick] [--batch 128]
[--no-rss] [--out STEM]``.

One step = ``ContSup.train_step`` (zero_grad, K module forwards each followed at once by the
backward of its loss, one SGD step) on a batch of random 3x32x32 inputs, ResNet-32, K = 1 (plain
end-to-end training: same ops as ``CE(model(x), y).backward()``) and K = 2/4/8/16 with the
InfoPro equal-layer split, context R0 and E (the public code's image encoder at full
resolution), plus E with ``encoder_resolution="boundary"`` (the image pooled to the boundary's
size before the encoder, a deviation from the public code). Measures:

- peak live saved bytes (CPU and CUDA): every tensor autograd saves for backward is tracked
  through ``torch.autograd.graph.saved_tensors_hooks`` until its graph is freed; the figure is
  the largest total of unique live non-parameter storages at any time in the step. End to end
  that is the whole forward's; with immediate per-module backward it is the max over modules.
- CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the allocated memory before
  it (parameters, optimizer state, batch), i.e. activations + gradients + workspace.
- CPU (not with --quick or --no-rss): peak RSS growth of a fresh process over 2 steps (VmHWM
  reset after setup), the allocator's view, noisier.
- the context projectors' parameters and per-sample MACs (``ContSup.cost_report``).

Target: K=16 with R0 at or below 25 % of the end-to-end peak saved bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from benchmarks.report import Run, add_common_arguments
from bwrf_ext.memory import saved_activation_bytes
from bwrf_ext.methods.contsup import ContSup, ContSupConfig
from bwrf_ext.models import resnet32

BATCH = 128
TARGET = 0.25
MODULES = (1, 2, 4, 8, 16)
# variant name -> (context, encoder_resolution); K = 1 has no context and runs once
CONTEXTS = {"R0": ("R0", "input"), "E": ("E", "input"), "E@boundary": ("E", "boundary")}
RSS_STEPS = 2


def make_contsup(num_modules: int, variant: str, device: torch.device, seed: int = 0) -> ContSup:
    """A ResNet-32 ContSup in train mode; the same main-net weights for every variant."""
    context, resolution = CONTEXTS[variant]
    torch.manual_seed(seed)
    net = resnet32().to(device)
    config = ContSupConfig(num_modules=num_modules, context=context,
                           encoder_resolution=resolution)
    return ContSup(net, config).train()


def batch_of(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size, 3, 32, 32, generator=gen)
    return x.to(device), torch.randint(0, 10, (size,), generator=gen).to(device)


def measure(num_modules: int, variant: str, device: torch.device, batch: int) -> dict:
    """Peak live saved bytes (and CUDA peak over resting memory) of one training step."""
    cs = make_contsup(num_modules, variant, device)
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = batch_of(batch, device)
    cs.train_step(x, y, optimizer)  # optimizer state, lazy init, allocator warm-up
    result = {}
    if device.type == "cuda":
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        resting = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with saved_activation_bytes(cs.parameters()) as tracker:
        out = cs.train_step(x, y, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_peak_over_resting"] = torch.cuda.max_memory_allocated(device) - resting
    if tracker.live:
        raise RuntimeError(f"contsup_memory: {len(tracker.live)} saved storages outlived the step")
    cost = cs.cost_report((1, 3, 32, 32))
    result.update(
        peak_saved_bytes=tracker.peak,
        loss=float(out.loss),
        boundaries=[list(p) for p in cs.boundaries],
        context_params=cost.context.params,
        context_macs=cost.context.macs,
        main_macs=cost.main.macs,
    )
    return result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_child(num_modules: int, variant: str, batch: int) -> None:
    """In a fresh process: prints the RSS growth (KiB) over RSS_STEPS steps, after setup."""
    device = torch.device("cpu")
    cs = make_contsup(num_modules, variant, device)
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = batch_of(batch, device)
    setup = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (Linux >= 4.0)
        f.write("5")
    for _ in range(RSS_STEPS):
        cs.train_step(x, y, optimizer)
    print(json.dumps({"growth_kib": _status_kib("VmHWM") - setup}))


def rss_growth(num_modules: int, variant: str, batch: int) -> int:
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--rss-child", str(num_modules), variant,
         "--batch", str(batch)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["growth_kib"] * 1024


def to_markdown(meta: dict, rows: dict[str, dict], batch: int) -> str:
    """One row per K, R0 / E / E@boundary columns as % of end to end; the verdict."""
    e2e = rows["K1"]
    cuda = "cuda_peak_over_resting" in e2e
    rss = "rss_growth" in e2e

    def cell(r: dict, key: str) -> str:
        return f"{r[key] / 2**20:.1f} MiB ({100 * r[key] / e2e[key]:.0f} %)"

    lines = [
        f"# ContSup step memory, ResNet-32, batch {batch}, 32x32 (one step each)",
        "",
        f"- bwrf_ext backend: {meta['backend']}; torch {meta['torch']}; {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads",
        "- step: ContSup.train_step (per-module backward right after each module, one SGD step); "
        "K=1 is plain end-to-end training; splits: InfoPro equal-layer table",
        "- peak saved = max over the step of the unique live non-parameter storages autograd "
        "holds for backward (saved_tensors_hooks, released when backward frees each graph)",
        "- E: the public image encoder (full-resolution convs, then pooled); E@boundary: the "
        "image pooled to the boundary's size first (our option, not the public code's)",
    ]
    if cuda:
        lines.append("- CUDA: max_memory_allocated during the step minus allocated before it")
    if rss:
        lines.append(f"- RSS: VmHWM growth of a fresh process over {RSS_STEPS} steps (noisy)")
    header = "| K | " + " | ".join(f"{v} peak saved (% E2E)" for v in CONTEXTS)
    header += (" | E context params | context MMACs E / E@boundary "
               f"(main net: {e2e['main_macs'] / 1e6:.1f}) |")
    lines += ["", header, "|---" * (len(CONTEXTS) + 3) + "|"]
    for k in MODULES:
        if k == 1:
            cells = [cell(e2e, "peak_saved_bytes")] + ["(same)"] * (len(CONTEXTS) - 1)
            lines.append(f"| 1 (E2E) | {' | '.join(cells)} | 0 | 0 |")
            continue
        cells = [cell(rows[f"K{k}-{v}"], "peak_saved_bytes") for v in CONTEXTS]
        e, eb = rows[f"K{k}-E"], rows[f"K{k}-E@boundary"]
        lines.append(f"| {k} | {' | '.join(cells)} | {e['context_params']:,} | "
                     f"{e['context_macs'] / 1e6:.1f} / {eb['context_macs'] / 1e6:.1f} |")
    for key, title in (("cuda_peak_over_resting", "CUDA peak over resting"),
                       ("rss_growth", "RSS growth")):
        if key not in e2e:
            continue
        lines += ["", f"| K | {title}: " + " | ".join(CONTEXTS) + " |",
                  "|---" * (len(CONTEXTS) + 1) + "|"]
        lines.append(f"| 1 (E2E) | {cell(e2e, key)} |" + " |" * (len(CONTEXTS) - 1))
        for k in MODULES[1:]:
            lines.append(f"| {k} | " + " | ".join(cell(rows[f"K{k}-{v}"], key)
                                                  for v in CONTEXTS) + " |")
    ratio = rows["K16-R0"]["peak_saved_bytes"] / e2e["peak_saved_bytes"]
    verdict = "met" if ratio <= TARGET else "NOT met"
    lines += ["", f"Target K=16 R0 <= {100 * TARGET:.0f} % of E2E peak saved bytes: **{verdict}** "
              f"({100 * ratio:.1f} %)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measures every (K, context), prints the table, writes .json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "contsup_memory")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.batch)
        return
    run = Run.begin("contsup_memory", args, quick=(0.0, 1), full=(0.0, 1), batch=args.batch,
                    model="resnet32", target=TARGET)
    cases = [(1, "R0")] + [(k, v) for k in MODULES[1:] for v in CONTEXTS]
    rows = {}
    for k, variant in cases:
        name = "K1" if k == 1 else f"K{k}-{variant}"
        rows[name] = measure(k, variant, run.device, args.batch)
        if run.device.type == "cpu" and not (args.quick or args.no_rss):
            rows[name]["rss_growth"] = rss_growth(k, variant, args.batch)
        print(f"{name}: peak saved {rows[name]['peak_saved_bytes'] / 2**20:.1f} MiB", flush=True)
    e2e = rows["K1"]["peak_saved_bytes"]
    record = {"rows": rows,
              "fraction_of_e2e": {n: r["peak_saved_bytes"] / e2e for n, r in rows.items()}}
    run.write(record, to_markdown(run.meta, rows, args.batch))


if __name__ == "__main__":
    main()
