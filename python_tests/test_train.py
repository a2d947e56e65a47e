"""bwrf-train: bad input, checkpoints and exact resume, reports, and torchrun vs one process."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bwrf_ext.train import main
from bwrf_ext.train import runner as runner_module
from bwrf_ext.train.checkpoint import CheckpointError, fp_weights, load_checkpoint, save_atomic
from bwrf_ext.train.lock import LOCK_NAME
from bwrf_ext.train.methods import Method

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--no-progress", "--batch-size", "64"]


def run_cli(args: list[str], out: Path | None = None) -> int:
    return main([*args, *QUICK, *(["--out", str(out)] if out else [])])


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory) -> Path:
    """A 2-epoch FP small_cnn on digits: the --init-from of the LSQ/BWRF tests."""
    out = tmp_path_factory.mktemp("runs") / "fp"
    assert run_cli(["--epochs", "2", "--seed", "1"], out) == 0
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


BAD_INPUTS = [
    (["--model", "resnet9000"], "--model 'resnet9000' is unknown"),
    (["--dataset", "mnist-but-not"], "--dataset must be one of"),
    (["--method", "qat"], "--method must be one of"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "is not a directory"),
    (["--method", "lsq", "--w-bits", "1"], "--w-bits must be in [2, 8], got 1"),
    (["--method", "lsq", "--a-bits", "9"], "--a-bits must be in [2, 8], got 9"),
    (["--w-bits", "4"], "use --method lsq or bwrf, not fp"),
    (["--method", "bwrf"], "--method bwrf needs --init-from"),
    (["--amp", "--device", "cpu"], "--amp is bf16 autocast on CUDA"),
    (["--resume", "--overwrite"], "pick one"),
    (["--data-dir", "."], "--dataset digits comes with scikit-learn"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--unknown-flag"], "unrecognized arguments"),
    (["--method", "lsq", "--branches", "1"], "--branches is for --method bwrf or blockkd, not lsq"),
    (["--method", "bwrf", "--branches", "0,1"], "--branches must be distinct block indices >= 1"),
    (["--method", "bwrf", "--branches", "1,x"], "like 1,2, or none; got '1,x'"),
    (["--nesterov", "--optimizer", "adamw"], "needs --optimizer sgd with --momentum > 0, got "
                                             "--optimizer adamw, --momentum 0.9"),
    (["--step-init", "mse"], "--step-init sets the quantizers: it needs a quantized model"),
    (["--method", "lsq", "--clip-test", "after"], "--clip-test: invalid choice: 'after'"),
    # Issue 17: options that used to crash with a traceback (or ran with a nonsense value).
    (["--alpha", "-1"], "--alpha must be a finite number >= 0, got -1.0"),
    (["--alpha", "nan"], "--alpha must be a finite number >= 0, got nan"),
    (["--method", "bwrf", "--init-from", "x.pt", "--alpha", "-1"], "--alpha must be a finite"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--method", "blockkd", "--teacher-from", "x.th", "--gamma", "-1"],
     "--gamma must be a finite number >= 0, got -1.0"),
    (["--momentum", "-1"], "--momentum must be in [0, 1), got -1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--workers", "-1"], "--workers must be >= 0 (0: load in the main process), got -1"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--train-subset", "5"], "--train-subset 5 is fewer than the 10 classes"),
    (["--test-subset", "1"], "--test-subset 1 is fewer than the 10 classes"),
    (["--method", "contsup", "--contsup-split", "halves"],
     "--contsup-split must be one of infopro, infopro_balanced, even, balanced, got 'halves'"),
    (["--method", "contsup", "--contsup-context", "X9"],
     "--contsup-context must be R0, E, R<n> or R<n>E with n >= 1 (e.g. R1, R1E), got 'X9'"),
    (["--method", "contsup", "--contsup-k", "100"],
     "--method contsup: ContSup: num_modules must be in [1, 10] for this model"),
    (["--normalization", "imagenet"],
     "--normalization imagenet is for RGB images; digits is grayscale and small_cnn takes it"),
    (["--model", "vit_b_16"], "--model vit_b_16 cannot take the 3x8x8 images of digits: "
                              "AssertionError: Wrong image height!"),
    (["--batch-size", "100000"], "--batch-size 100000 exceeds the 1437 training images"),
    (["--init-from", "/nonexistent/weights.pt"], "checkpoint /nonexistent/weights.pt does not "
                                                 "exist"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a[0]) for a in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bwrf-train: error: ") and "\n" not in err, err
    assert message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bwrf-train: error: --device cuda: torch sees no CUDA device")
    assert not (tmp_path / "r").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory\n")
    assert main(["--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (
        f"bwrf-train: error: --out {tmp_path / 'file'} is a file; a run needs a directory\n"
    )
    assert main(["--out", str(tmp_path / "file" / "run")]) == 2
    assert "cannot create or lock the run directory: Not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a directory\n"


def _idx(dims: tuple[int, ...], payload: bytes | None = None) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + (bytes(math.prod(dims)) if payload is None else payload)


def _bad_data(root: Path, case: str) -> tuple[list[str], str]:
    """Writes a broken data set under root; returns (bwrf-train options, expected message)."""
    root.mkdir()
    npz = root / "cifar10_jpeg_q75.npz"
    cifar = ["--dataset", "cifar10", "--data-dir", str(root)]
    fashion = ["--dataset", "fashion-mnist", "--data-dir", str(root)]
    archive = "is not a readable CIFAR-10 JPEG archive: expected a NumPy .npz holding train_jpeg"
    if case == "npz truncated":
        np.savez(npz, train_jpeg=np.zeros(4000, np.uint8))
        npz.write_bytes(npz.read_bytes()[:1000])
        return cifar, f"{npz} {archive}"
    if case == "npz wrong keys":
        np.savez(npz, images=np.zeros(3))
        return cifar, f"{npz} {archive}"
    if case == "npz is text":
        npz.write_text("hello\n")
        return cifar, f"{npz} {archive}"
    if case == "empty cifar-10-batches-py":
        (root / "cifar-10-batches-py").mkdir()
        return cifar, (f"{root / 'cifar-10-batches-py'} is incomplete or corrupt: expected "
                       "data_batch_1..5, test_batch and batches.meta")  # fmt: skip
    files = {"train-images-idx3-ubyte": _idx((4, 28, 28)), "train-labels-idx1-ubyte": _idx((4,)),
             "t10k-images-idx3-ubyte": _idx((2, 28, 28)), "t10k-labels-idx1-ubyte": _idx((2,))}
    bad = root / "train-images-idx3-ubyte"
    if case == "idx garbage":
        files[bad.name] = bytes(range(7, 57))
        expected = (f"{bad} is not an MNIST idx file of unsigned bytes: expected the magic "
                    "number 0x0000080N (N = 1..4 dimensions), got 0x0708090a")  # fmt: skip
    elif case == "idx short":
        files[bad.name] = _idx((4, 28, 28), payload=bytes(100))
        expected = (f"{bad} is truncated: its header announces 4x28x28 bytes (3152 with the "
                    "header), the file holds 116")  # fmt: skip
    else:  # labels beyond the 10 classes
        files["train-labels-idx1-ubyte"] = _idx((4,), payload=bytes([0, 1, 2, 12]))
        expected = f"{root}: train labels must lie in [0, 9] (10 classes), got [0, 12]"
    for name, content in files.items():
        (root / name).write_bytes(content)
    return fashion, expected


BAD_DATA = ["npz truncated", "npz wrong keys", "npz is text", "empty cifar-10-batches-py",
            "idx garbage", "idx short", "idx labels out of range"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_files_are_one_line_naming_the_file(case, tmp_path, capsys):
    options, expected = _bad_data(tmp_path / "data", case)
    out = tmp_path / "run"
    assert main([*options, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bwrf-train: error: ") and "\n" not in err, err
    assert expected in err, err
    assert not out.exists()


def test_akamaster_weights_for_small_cnn_do_not_fit(tmp_path, capsys):
    from bwrf_ext.models.pretrained import akamaster_weights_path

    try:
        path = akamaster_weights_path(20)
    except FileNotFoundError as error:
        pytest.skip(f"../shared weights absent: {error}")
    assert main(["--init-from", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bwrf-train: error: --init-from {path} holds akamaster weights, trained on "
                   "RGB images with ImageNet statistics: they do not fit small_cnn on the "
                   "grayscale digits images")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_missing_data_names_the_places(tmp_path, capsys):
    assert main(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--out",
                 str(tmp_path / "r")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "CIFAR-100 not found" in err and str(tmp_path) in err and "--download" in err


def test_existing_run_is_not_overwritten(fp_run, capsys):
    before = (fp_run / "last.pt").read_bytes()
    assert run_cli(["--epochs", "1"], fp_run) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (fp_run / "last.pt").read_bytes() == before


def test_reports_per_epoch(fp_run):
    rows = records(fp_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["acc"] <= 100 and r["train_loss"] > 0 for r in rows)
    csv_lines = (fp_run / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].split(",")[:2] == ["epoch", "lr"]
    assert (fp_run / "accuracy.png").stat().st_size > 1000
    summary = json.loads((fp_run / "summary.json").read_text())
    assert summary["final"] == rows[-1]


def test_checkpoint_reloads_the_model(fp_run):
    """The saved model reproduces the logged test accuracy (independent evaluation)."""
    from bwrf_ext.data import load_image_data
    from bwrf_ext.models.registry import build_model

    ckpt = load_checkpoint(fp_run)
    data = load_image_data("digits")
    model = build_model("small_cnn", data.shape)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y = torch.tensor([data.test[i][1] for i in range(len(data.test))])
    with torch.no_grad():
        acc = 100.0 * int((model(x).argmax(1) == y).sum()) / len(y)
    assert acc == pytest.approx(records(fp_run)[-1]["acc"], abs=1e-9)


def test_bwrf_run_reports_every_branch(fp_run, tmp_path):
    out = tmp_path / "bwrf"
    args = ["--method", "bwrf", "--w-bits", "2", "--a-bits", "2", "--init-from", str(fp_run)]
    assert run_cli([*args, "--epochs", "1"], out) == 0
    row = records(out)[-1]
    assert {"acc", "acc_mp1", "acc_mp2", "acc_fp", "train_mp1_ce", "train_lp_kd"} <= set(row)
    # The frozen partner is the FP run's model: its accuracy is the FP run's.
    assert row["acc_fp"] == pytest.approx(records(fp_run)[-1]["acc"], abs=1e-9)
    ckpt = load_checkpoint(out)
    assert ckpt["quantized"] and ckpt["partner"] is not None


RESUMED_METHODS = {
    "bwrf": ["--method", "bwrf", "--w-bits", "2", "--a-bits", "2", "--init-from"],
    # A student with its own trained connectors, distilled from the FP run as teacher.
    "blockkd": ["--method", "blockkd", "--w-bits", "3", "--a-bits", "3", "--teacher-from"],
}


@pytest.mark.parametrize("method", RESUMED_METHODS)
def test_interrupted_then_resumed_equals_uninterrupted(method, fp_run, tmp_path, ctrl_c_at_epoch):
    """Bit-identical, batched crops and flips included (drawn per (seed, epoch, batch))."""
    args = [*RESUMED_METHODS[method], str(fp_run), "--epochs", "3", "--seed", "3",
            "--augment", "crop-flip"]  # fmt: skip
    if method == "blockkd":
        args += ["--teacher-model", "small_cnn"]
    assert run_cli(args, tmp_path / "straight") == 0

    with ctrl_c_at_epoch(2):
        assert run_cli(args, tmp_path / "cut") == 130
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 2
    assert main(["--resume", "--out", str(tmp_path / "cut"), "--no-progress"]) == 0

    def strip_time(rows):
        return [{k: v for k, v in r.items() if k != "train_s"} for r in rows]

    assert strip_time(records(tmp_path / "cut")) == strip_time(records(tmp_path / "straight"))
    straight = load_checkpoint(tmp_path / "straight")["trainable"]
    resumed = load_checkpoint(tmp_path / "cut")["trainable"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_refuses_changed_options(fp_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(fp_run, out)
    assert main(["--resume", "--out", str(out), "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs from the resumed run's" in capsys.readouterr().err


def test_resume_of_a_checkpoint_older_than_an_option(fp_run, tmp_path, capsys):
    """A checkpoint written before --nesterov/--branches existed resumes with their defaults."""
    out = tmp_path / "old"
    shutil.copytree(fp_run, out)
    ckpt = load_checkpoint(out / "last.pt")
    for newer in ("nesterov", "branches"):
        del ckpt["args"][newer]
    del ckpt["sha256"]  # such a checkpoint had no checksum either
    save_atomic(ckpt, out / "last.pt")
    assert main(["--resume", "--out", str(out), "--nesterov"]) == 2
    assert "--nesterov True differs from the resumed run's False" in capsys.readouterr().err
    assert main(["--resume", "--out", str(out), "--no-progress"]) == 0


def test_resume_of_a_checkpoint_older_than_clip_test_keeps_atens(fp_run, tmp_path, capsys):
    """Before --clip-test existed every run used ATen's test: a resumed one goes on with it."""
    out = tmp_path / "old-lsq"
    assert run_cli(["--method", "lsq", "--w-bits", "2", "--a-bits", "2", "--init-from",
                    str(fp_run), "--epochs", "2"], out) == 0  # fmt: skip
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["args"]["clip_test"] == "before_round" and ckpt["args"]["step_init"] == "mse"
    del ckpt["args"]["clip_test"]
    del ckpt["sha256"]  # such a checkpoint had no checksum either
    save_atomic(ckpt, out / "last.pt")
    assert main(["--resume", "--out", str(out), "--clip-test", "before_round"]) == 2
    assert "--clip-test before_round differs from the resumed run's after_round" in (
        capsys.readouterr().err
    )


class NotWeights:
    """An arbitrary object: what weights_only=True must refuse to unpickle."""


def test_corrupt_and_mismatched_checkpoints(fp_run, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(fp_run, out)
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:1000])
    assert main(["--resume", "--out", str(out)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err

    wrong = tmp_path / "resnet20.pt"
    from bwrf_ext.models import resnet20

    torch.save(resnet20(in_channels=1).state_dict(), wrong)
    assert run_cli(["--method", "lsq", "--init-from", str(wrong)], tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "missing" in err
    assert not (tmp_path / "r" / "last.pt").exists()

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": NotWeights()}, unsafe)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        fp_weights(unsafe)  # weights_only=True refuses arbitrary pickled objects


def test_quantized_checkpoint_is_not_fp_weights(fp_run, tmp_path, capsys):
    out = tmp_path / "lsq"
    assert run_cli(["--method", "lsq", "--init-from", str(fp_run), "--epochs", "1"], out) == 0
    assert run_cli(["--method", "lsq", "--init-from", str(out)], tmp_path / "again") == 2
    assert "holds a quantized model" in capsys.readouterr().err


def test_save_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert run_cli(["--model", "mlp", "--epochs", "1", "--tensorboard"], out) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_akamaster_weights_are_fp_weights_with_imagenet_normalization():
    from bwrf_ext.models import resnet20
    from bwrf_ext.models.pretrained import akamaster_weights_path

    try:
        path = akamaster_weights_path(20)
    except FileNotFoundError as error:
        pytest.skip(f"../shared weights absent: {error}")
    state, info = fp_weights(path)
    assert info["normalization"] == "imagenet" and info["source"] == "akamaster"
    model = resnet20()
    from bwrf_ext.train.checkpoint import load_into

    load_into(model, state, "akamaster")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def torchrun(args: list[str], out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "bwrf_ext.train", *args, *QUICK, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["fp", "lsq"])
def test_torchrun_two_processes_match_one(method, tmp_path):
    """Same global batch: 2 gloo processes give the one-process result.

    A BatchNorm-free net, since BatchNorm normalises each process's share of the batch. LSQ
    matches because the runner tells the activation quantizers the data-parallel size (their
    gradient factor counts the global batch; without it the weights differ by up to 40 % here).
    LSQ runs 16 steps only: the all-reduce sums in another order, and over many steps a 1e-8
    difference eventually flips a 4-bit code, after which the runs drift apart legitimately.
    It uses LSQ's step init: the default mse init puts each channel's largest weight exactly on
    the clip boundary, where that 1e-8 difference flips its gradient within the 16 steps.
    With crops and flips: each process takes its rows of one draw over the global batch.
    """
    args = ["--model", "mlp", "--epochs", "2", "--seed", "5", "--method", method,
            "--augment", "crop-flip"]  # fmt: skip
    if method == "lsq":
        args += ["--w-bits", "4", "--a-bits", "4", "--train-subset", "512", "--step-init", "lsq"]
    result = torchrun(args, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli(args, tmp_path / "single") == 0
    ddp, single = records(tmp_path / "ddp"), records(tmp_path / "single")
    for a, b in zip(ddp, single, strict=True):
        assert a["acc"] == pytest.approx(b["acc"], abs=0.3)  # at most one test image of 360
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    ddp_model = load_checkpoint(tmp_path / "ddp")["model"]
    single_model = load_checkpoint(tmp_path / "single")["model"]
    for key, value in single_model.items():
        torch.testing.assert_close(ddp_model[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def test_bwrf_without_branches_nor_kd_is_lsq(fp_run, tmp_path, capsys):
    """--branches none --alpha 0 leaves BWRF with the LP cross-entropy alone: plain LSQ."""
    common = ["--w-bits", "2", "--a-bits", "2", "--init-from", str(fp_run), "--epochs", "1"]
    bwrf, lsq = tmp_path / "bwrf", tmp_path / "lsq"
    assert run_cli(["--method", "bwrf", "--branches", "none", "--alpha", "0", *common], bwrf) == 0
    assert run_cli(["--method", "lsq", *common], lsq) == 0
    row, plain = records(bwrf)[-1], records(lsq)[-1]
    assert not any(k.startswith(("acc_mp", "train_mp")) for k in row)
    assert row["train_lp_ce"] == pytest.approx(plain["train_loss"], rel=1e-6)
    assert row["acc"] == plain["acc"]
    trained, reference = load_checkpoint(bwrf)["model"], load_checkpoint(lsq)["model"]
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, msg=key)
    # A block the split does not have: one line naming the option and the valid range.
    assert run_cli(["--method", "bwrf", "--branches", "7", *common], tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "--branches 7: BWRFConfig: branch 7 does not exist" in err and "1..2" in err


def test_torchrun_bwrf(fp_run, tmp_path):
    args = ["--method", "bwrf", "--w-bits", "2", "--a-bits", "2", "--init-from", str(fp_run),
            "--epochs", "1"]  # fmt: skip
    result = torchrun(args, tmp_path / "ddp_bwrf")
    assert result.returncode == 0, result.stderr[-3000:]
    row = records(tmp_path / "ddp_bwrf")[-1]
    assert row["acc_fp"] == pytest.approx(records(fp_run)[-1]["acc"], abs=1e-9)
    assert "acc_mp2" in row


def test_blockkd_run_reports_stones_and_teacher(fp_run, tmp_path, capsys):
    out = tmp_path / "blockkd"
    args = ["--method", "blockkd", "--model", "mlp", "--teacher-model", "small_cnn",
            "--teacher-from", str(fp_run), "--epochs", "1", "--kd", "dkd"]  # fmt: skip
    assert main(["--method", "blockkd", "--out", str(out)]) == 2
    assert "--method blockkd needs --teacher-from" in capsys.readouterr().err
    assert run_cli(["--method", "blockkd", "--teacher-model", "small_cnn", "--teacher-from",
                    str(fp_run), "--epochs", "1"], out) == 0  # fmt: skip
    row = records(out)[-1]
    assert {"acc", "acc_stone1", "acc_stone2", "acc_teacher", "train_stone1_kd"} <= set(row)
    assert row["acc_teacher"] == pytest.approx(records(fp_run)[-1]["acc"], abs=1e-9)
    ckpt = load_checkpoint(out)
    assert any(k.startswith("connectors.") for k in ckpt["trainable"])
    assert not any(k.startswith("connectors.") for k in ckpt["model"])
    # A student of another architecture than the teacher (an MLP has no blocks to graft).
    assert run_cli(args, tmp_path / "mlp") == 2
    assert "mlp has no block split" in capsys.readouterr().err


def test_blockkd_kd_step_is_plain_kd(fp_run, tmp_path):
    """``--method blockkd --branches none`` as bwrf-train builds it (teacher read, frozen, in
    eval mode; the first training batch) takes the step of an independent CE + T^2 KL: same
    loss, same gradients. The teacher here has BatchNorm, so a teacher left in train mode (or
    any other teacher than the file's) would change the loss."""
    from bwrf_ext.models.registry import build_model
    from bwrf_ext.train import build, distributed
    from bwrf_ext.train.config import parse_args

    config = parse_args(["--method", "blockkd", "--branches", "none", "--teacher-model",
                         "small_cnn", "--teacher-from", str(fp_run), "--temperature", "3",
                         *QUICK, "--out", str(tmp_path / "kd")])  # fmt: skip
    dist = distributed.setup(config.device)
    built = build.build(config, dist, None)
    loader, _ = build.loaders(config, dist, built.data)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    method = built.method
    method.trainable.train()
    terms = method.step(method.trainable, x, y, torch.autocast("cpu", enabled=False))

    shape = built.data.shape
    teacher = build_model("small_cnn", shape)
    teacher.load_state_dict(load_checkpoint(fp_run)["model"])
    teacher.eval()
    student = build_model("small_cnn", shape)
    student.load_state_dict(method.model.state_dict())
    student.train()
    with torch.no_grad():
        target = torch.softmax(teacher(x) / 3, 1)
    logits = student(x)
    kd = 9 * torch.nn.functional.kl_div(torch.log_softmax(logits / 3, 1), target,
                                        reduction="batchmean")  # fmt: skip
    loss = torch.nn.functional.cross_entropy(logits, y) + kd
    loss.backward()
    assert terms["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert terms["student_kd"] == pytest.approx(kd.item(), rel=1e-5)
    expected = dict(student.named_parameters())
    for name, param in method.model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, msg=name)


def test_contsup_run_logs_every_module(tmp_path):
    out = tmp_path / "contsup"
    args = ["--method", "contsup", "--model", "resnet20", "--contsup-k", "3",
            "--contsup-context", "R1", "--epochs", "1"]  # fmt: skip
    assert run_cli(args, out) == 0
    row = records(out)[-1]
    # The published preset's local loss is SupCon (the public ContSup code's default).
    assert {"train_module1_supcon", "train_module2_supcon", "train_final_ce", "acc"} <= set(row)
    # The saved model is the wrapper: the context projectors are part of the network.
    assert any(k.startswith("context.") for k in load_checkpoint(out)["model"])


def test_torchrun_contsup(tmp_path):
    """ContSup backpropagates inside its step: gradients are all-reduced by the loop instead."""
    args = ["--method", "contsup", "--model", "resnet20", "--contsup-k", "2",
            "--contsup-context", "R0", "--epochs", "1"]  # fmt: skip
    result = torchrun(args, tmp_path / "ddp_contsup")
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(tmp_path / "ddp_contsup")[-1]["acc"] > 10.0  # above chance after an epoch


# ------------------------------------------------------------------ issue 17: runs are never lost
def _snapshot(out: Path) -> dict[str, bytes]:
    """The run's files and their bytes (the lock file of whoever runs on it aside)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name != LOCK_NAME}  # fmt: skip


OVERWRITE_FAILURES = {
    "missing --init-from": (["--init-from", "/nonexistent/fp.pt"], "does not exist"),
    "bad --batch-size": (["--batch-size", "5000"], "exceeds the 1437 training images"),
    "bad --train-subset": (["--train-subset", "5"], "fewer than the 10 classes"),
    "corrupt data file": (None, "is not a readable CIFAR-10 JPEG archive"),
    "non-finite loss in epoch 1": (["--lr", "1e30"], "the loss is nan at epoch 1"),
}


@pytest.mark.parametrize("case", OVERWRITE_FAILURES)
def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(case, fp_run, tmp_path,
                                                                   capsys):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(fp_run, out)
    before = _snapshot(out)
    options, message = OVERWRITE_FAILURES[case]
    if options is None:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "cifar10_jpeg_q75.npz").write_text("not an archive\n")
        options = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data")]
    assert main([*options, "--overwrite", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert _snapshot(out) == before, "the old run must survive a replacement that failed"


def test_overwrite_replaces_the_old_run_once_the_new_one_checkpoints(fp_run, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(fp_run, out)
    before = _snapshot(out)
    seen_during_epoch_1 = {}
    original = runner_module._Run._train_epoch

    def look_then_train(self, *a):
        if a[-1] == 0:  # epoch 1 runs while the old run is still complete on disk
            seen_during_epoch_1.update(_snapshot(out))
        return original(self, *a)

    monkeypatch.setattr(runner_module._Run, "_train_epoch", look_then_train)
    assert run_cli(["--epochs", "1", "--seed", "7", "--overwrite"], out) == 0
    assert seen_during_epoch_1 == before
    assert [r["epoch"] for r in records(out)] == [1]  # the old run had 2 epochs
    log = (out / "log.txt").read_text()
    assert log.count("fp small_cnn on digits") == 1 and "epoch 2/2" not in log
    assert load_checkpoint(out)["args"]["seed"] == 7


def test_interrupt_in_epoch_1_leaves_nothing_and_a_retry_works(tmp_path, ctrl_c_at_epoch, capsys):
    out = tmp_path / "runs" / "fresh"
    with ctrl_c_at_epoch(0):
        assert run_cli(["--epochs", "1"], out) == 130
    err = capsys.readouterr().err
    assert err == ("bwrf-train: interrupted; no epoch finished, so nothing was written: run the "
                   "same command to start again\n")  # fmt: skip
    assert "--resume" not in err
    assert not (tmp_path / "runs").exists()  # the directories it made are gone again
    assert run_cli(["--epochs", "1"], out) == 0  # the plain retry: no --overwrite needed
    assert not (out / LOCK_NAME).exists()  # released on exit


def test_interrupt_after_a_checkpoint_suggests_resume(tmp_path, ctrl_c_at_epoch, capsys):
    out = tmp_path / "run"
    with ctrl_c_at_epoch(1):
        assert run_cli(["--epochs", "2"], out) == 130
    assert capsys.readouterr().err == (
        f"bwrf-train: interrupted; the checkpoint of epoch 1 is kept in {out}: continue with "
        "--resume\n"
    )
    assert main(["--resume", "--out", str(out), "--no-progress"]) == 0


def test_failed_run_leaves_a_given_directory_as_it_was(tmp_path, capsys):
    """A directory made by someone else (a results script's console log) is kept, unchanged."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "console.txt").write_text("launched\n")
    assert main(["--batch-size", "5000", "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["console.txt"]
    assert main(["--resume", "--out", str(out)]) == 2
    assert "start it without --resume" in capsys.readouterr().err


def test_non_finite_loss_says_what_was_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_cli(["--lr", "1e30", "--epochs", "2"], out) == 2
    err = capsys.readouterr().err
    assert err.startswith("bwrf-train: error: the loss is nan at epoch 1, step ")
    assert err.endswith("; no epoch finished, so nothing was written; try a lower --lr than "
                        "1e+30\n")  # fmt: skip
    assert not out.exists()
    # After a checkpoint: a NaN in epoch 2 (steps 1..22 are epoch 1 at 1437 images / 64).
    original, calls = Method.step, []

    def nan_in_epoch_2(self, *a):
        calls.append(1)
        terms = original(self, *a)
        return {**terms, "loss": math.nan} if len(calls) > 22 else terms

    monkeypatch.setattr(Method, "step", nan_in_epoch_2)
    assert run_cli(["--epochs", "2"], out) == 2
    assert capsys.readouterr().err.endswith(
        f"; the checkpoint of epoch 1 is kept in {out}; try a lower --lr than 0.1 in a new run "
        "(--overwrite or another --out)\n"
    )
    assert load_checkpoint(out)["epoch"] == 1


# ------------------------------------------------------------------ issue 17: the lock on --out
LOCK_HOLDER = r"""
import sys, time
from bwrf_ext.train.lock import RunDirectoryLock
lock = RunDirectoryLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_out_is_refused_naming_the_holder(fp_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(fp_run, out)
    before = _snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main([*extra, "--epochs", "3", "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"bwrf-train: error: --out {out} is in use by another "
                                  f"bwrf-train run (pid {holder.pid} on "), err  # fmt: skip
            assert "\n" not in err.strip()
        assert _snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its lock file stays behind, stale: the kernel dropped the flock with the process.
    assert (out / LOCK_NAME).is_file()
    assert main(["--resume", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    assert not (out / LOCK_NAME).exists()


# A bwrf-train process whose epoch 1 waits for a file to appear: a run caught mid-flight.
PAUSED_RUN = r"""
import pathlib, sys, time
from bwrf_ext.train import main, runner

go, original = pathlib.Path(sys.argv[1]), runner._Run._train_epoch

def wait_for_go(self, *a):
    while not go.exists():
        time.sleep(0.05)
    return original(self, *a)

runner._Run._train_epoch = wait_for_go
sys.exit(main(sys.argv[2:]))
"""


def test_two_runs_at_once_one_is_refused(tmp_path):
    """A real bwrf-train process in its epoch 1 (nothing written yet) holds --out: a second
    process is refused at once, with --overwrite too, and the first finishes untouched."""
    out, go = tmp_path / "run", tmp_path / "go"
    command = [sys.executable, "-m", "bwrf_ext.train", "--epochs", "2", *QUICK, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, str(go), *command[3:]], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first.stdout.readline().startswith("fp small_cnn on digits")  # set up, locked
        seconds = [subprocess.run([*command, *extra], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=300) for extra in ([], ["--overwrite"])]
    finally:
        go.touch()
        first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err[-2000:]
    for second in seconds:
        assert second.returncode == 2
        assert second.stderr.startswith(f"bwrf-train: error: --out {out} is in use by another "
                                        f"bwrf-train run (pid {first.pid} on "), second.stderr
    assert [r["epoch"] for r in records(out)] == [1, 2]


# ------------------------------------------------------------- issue 17: checkpoints' loose ends
def test_stale_temp_file_of_a_killed_write_is_removed(fp_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(fp_run, out)
    stale = out / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"")  # what a kill during save_atomic leaves
    assert main(["--resume", "--out", str(out), "--no-progress"]) == 0  # 2 of 2 epochs: done
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_flipped_bytes_inside_a_tensor_are_detected(fp_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(fp_run, out)
    path = out / "last.pt"
    weight = load_checkpoint(path)["model"]["fc.weight"]
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 16 : at + 32] = bytes(b ^ 0xFF for b in raw[at + 16 : at + 32])
    path.write_bytes(bytes(raw))
    # torch reads it without complaint, with another weight: what resuming used to train on.
    damaged = torch.load(path, weights_only=True)["model"]["fc.weight"]
    assert not torch.equal(damaged, weight)
    assert main(["--resume", "--epochs", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bwrf-train: error: checkpoint {path} is corrupt: its contents do not "
                          "match the sha256 stored when it was written")  # fmt: skip
    assert "\n" not in err
    with pytest.raises(CheckpointError, match="is corrupt"):
        fp_weights(out)


def test_checkpoint_read_errors_are_whole_sentences(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": NotWeights()}, unsafe)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    text = tmp_path / "text.pt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expected = {
        empty: "the file is empty",
        unsafe: r"it holds a Python object \([\w.]*NotWeights\) that weights_only=True refuses "
                r"to load; only tensors and plain values are read",
        truncated: r"not a complete torch.save file \(truncated or corrupt\)",
        text: r"not a torch.save file \(it has neither a zip nor a pickle header\)",
    }  # fmt: skip
    for path, reason in expected.items():
        with pytest.raises(CheckpointError) as caught:
            fp_weights(path)
        assert re.fullmatch(f"cannot read checkpoint {re.escape(str(path))}: {reason}",
                            str(caught.value)), str(caught.value)  # fmt: skip


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_mode_follows_the_umask_like_other_files(umask, tmp_path):
    old = os.umask(umask)
    try:
        save_atomic({"a": torch.ones(2)}, tmp_path / "last.pt")
        (tmp_path / "metrics.jsonl").write_text("{}\n")
    finally:
        os.umask(old)
    mode = (tmp_path / "last.pt").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "metrics.jsonl").stat().st_mode & 0o777


def test_run_files_share_one_mode(fp_run):
    modes = {p.name: p.stat().st_mode & 0o777 for p in fp_run.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_help_shows_no_default_for_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    flag_lines = [line for line in text.splitlines() if "--no-progress" in line]
    assert flag_lines and not any("default" in line for line in flag_lines), flag_lines
    assert not re.search(r"\(default: (True|False|None)\)", text)
    assert "(default: fp)" in text and "precision (default: 8)" in text  # valued options keep it


def test_pad_fill_reaches_the_training_crops(tmp_path):
    """--pad-fill mean gives the training set the mean-pixel border (black by default); the
    CLI refuses other values naming the option."""
    from bwrf_ext.train import build, distributed
    from bwrf_ext.train.config import parse_args
    from bwrf_ext.train.errors import UsageError

    dist = distributed.setup("cpu")
    for fill, expected in (([], None), (["--pad-fill", "mean"], "mean")):
        config = parse_args([*QUICK, "--augment", "crop-flip", *fill, "--out", str(tmp_path)])
        data = build._data(config, dist, "dataset")
        assert data.train.pad_fill == (expected or "black")
        if expected is None:
            assert data.train.fill is None
        else:  # the training split's mean, as a pixel
            mean = data.train.images.double().mean() / 255
            assert data.train.fill.tolist() == [int((mean * 255).round())]
    with pytest.raises(UsageError, match="--pad-fill: invalid choice: 'grey'"):
        parse_args([*QUICK, "--pad-fill", "grey"])
