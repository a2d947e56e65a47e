"""bwrf-train --compile: the methods' training forward in one graph, and compiled runs that
resume exactly with the plain model's checkpoint keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from bwrf_ext.train import build, distributed, main
from bwrf_ext.train.checkpoint import load_checkpoint
from bwrf_ext.train.config import parse_args
from bwrf_ext.train.errors import UsageError

QUICK = ["--no-progress", "--batch-size", "64", "--train-subset", "640", "--test-subset", "200"]
# fullgraph: whether the method's forward is one graph. Block-KD's is not: its connector
# warm-up and its ensemble gate (the stones' accuracy on the batch against the student's) are
# Python branches on tensors, so Dynamo splits the graph there.
FULLGRAPH = {"fp": True, "lsq": True, "bwrf": True, "blockkd": False}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code of one test does not count against the next one's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def fp_weights_file(tmp_path_factory) -> Path:
    """A small_cnn state_dict for digits (as the CLI builds it): BWRF's partner, Block-KD's
    teacher."""
    root = tmp_path_factory.mktemp("weights")
    config = parse_args(["--out", str(root / "unused"), *QUICK])
    method = build.build(config, distributed.setup("cpu"), None).method
    path = root / "small_cnn.pt"
    torch.save(method.model.state_dict(), path)
    return path


def method_args(method: str, weights: Path) -> list[str]:
    extra = {
        "fp": [],
        "lsq": ["--w-bits", "4", "--a-bits", "4"],
        "bwrf": ["--init-from", str(weights)],
        "blockkd": ["--teacher-from", str(weights), "--teacher-model", "small_cnn",
                    "--w-bits", "4", "--a-bits", "4"],
    }[method]  # fmt: skip
    return ["--method", method, *extra]


def loss_and_grads(method, module, x, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step's forward and backward as the loop runs it (Method.forward_loss on module)."""
    for p in method.trainable.parameters():
        p.grad = None
    loss, _ = method.forward_loss(module, x, y)
    loss.backward()
    return loss.detach(), [p.grad for p in method.trainable.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", FULLGRAPH)
def test_training_forward_compiles_to_the_eager_step(name, fp_weights_file, tmp_path):
    """The method as bwrf-train builds it (quantizers calibrated), its trainable module
    compiled (aot_eager: Dynamo and AOTAutograd without inductor's codegen, so the same aten
    ops run): fp, lsq and bwrf with fullgraph=True, so any graph break (the custom ops, LSQ's
    step-size init, the lean partner's autograd Functions) fails; gradients equal eager's."""
    config = parse_args([*method_args(name, fp_weights_file), "--out", str(tmp_path), *QUICK])
    built = build.build(config, distributed.setup("cpu"), None)
    method = built.method
    method.trainable.train()
    x = torch.stack([built.data.train[i][0] for i in range(32)])
    y = torch.stack([torch.as_tensor(built.data.train[i][1]) for i in range(32)])
    eager_loss, eager_grads = loss_and_grads(method, method.trainable, x, y)
    compiled = torch.compile(method.trainable, fullgraph=FULLGRAPH[name], backend="aot_eager")
    loss, grads = loss_and_grads(method, compiled, x, y)
    assert torch.equal(loss, eager_loss)
    assert len(grads) == len(eager_grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads, strict=True))
    # The compiled wrapper's own keys carry "_orig_mod."; the checkpoint's are the module's.
    assert set(compiled.state_dict()) == {f"_orig_mod.{k}" for k in method.trainable.state_dict()}


def test_compiled_run_resumes_exactly_with_plain_keys(tmp_path, ctrl_c_at_epoch):
    """LSQ (the custom ops) with the default inductor backend: a compiled run interrupted after
    epoch 2 and resumed with --compile ends bit for bit as the uninterrupted compiled run; its
    checkpoint keys are an eager run's; and it may go on without --compile."""
    args = ["--method", "lsq", "--w-bits", "3", "--a-bits", "3", "--epochs", "3", "--seed", "2",
            *QUICK]  # fmt: skip
    counters.clear()
    assert main([*args, "--compile", "--out", str(tmp_path / "straight")]) == 0
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]

    with ctrl_c_at_epoch(2):
        assert main([*args, "--compile", "--out", str(tmp_path / "cut")]) == 130
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_eager")
    assert main(["--resume", "--compile", "--out", str(tmp_path / "cut"), "--no-progress"]) == 0

    straight = load_checkpoint(tmp_path / "straight")
    resumed = load_checkpoint(tmp_path / "cut")
    assert [{k: v for k, v in r.items() if k != "train_s"} for r in resumed["history"]] == [
        {k: v for k, v in r.items() if k != "train_s"} for r in straight["history"]
    ]
    for part in ("model", "trainable"):
        assert straight[part].keys() == resumed[part].keys()
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part])
    assert straight["args"]["compile"] and resumed["args"]["compile"]

    assert main(["--resume", "--out", str(tmp_path / "cut_eager"), "--no-progress"]) == 0
    went_on_eagerly = load_checkpoint(tmp_path / "cut_eager")
    assert went_on_eagerly["epoch"] == 3 and not went_on_eagerly["args"]["compile"]
    graphs = counters["stats"]["unique_graphs"]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "eager")]) == 0
    assert counters["stats"]["unique_graphs"] == graphs  # without --compile nothing compiles
    eager = load_checkpoint(tmp_path / "eager")
    for part in ("model", "trainable"):
        assert straight[part].keys() == eager[part].keys()
        assert not any(k.startswith("_orig_mod") for k in straight[part])


def test_contsup_refuses_compile_also_on_resume(tmp_path):
    """ContSup backpropagates inside its step: --compile is refused, fresh or resumed."""
    with pytest.raises(UsageError, match="--compile does not apply to --method contsup"):
        parse_args(["--method", "contsup", "--compile", "--out", str(tmp_path)])
    saved = parse_args(["--method", "contsup", "--out", str(tmp_path)]).args()
    resuming = parse_args(["--resume", "--compile", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="--compile does not apply to --method contsup"):
        resuming.resumed(saved)
    assert parse_args(["--resume", "--out", str(tmp_path)]).resumed(saved).method == "contsup"
