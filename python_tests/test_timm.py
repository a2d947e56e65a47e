"""timm CNNs through the split registry: their splits come from their own feature_info (no
per-architecture code), and BWRF, Block-KD and ContSup train on them (random weights, tiny
inputs)."""

from __future__ import annotations

import warnings

import pytest
import torch

import bwrf_ext
from bwrf_ext import BWRF, BlockKD, ContSup, ContSupConfig, split_model
from bwrf_ext.models.registry import ImageShape, build_model, model_name_problem

timm = pytest.importorskip("timm", reason="timm is an optional dependency (requirements-dev)")

MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_large_100", "regnetx_002", "convnext_atto"]


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(f"timm:{name}", ImageShape(3, 32, 32, 10))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)


@pytest.mark.parametrize("name", MODELS)
def test_split_follows_the_stages_and_equals_the_forward(name: str):
    model = _model(name, 0)
    x, _ = _batch()
    split = split_model(model, example_input=x)  # checked against model(x) in eval mode
    assert split.num_blocks == 4  # one block per stage at stride 4, 8, 16, 32
    stage_ends = [f["module"] for f in model.feature_info if f["reduction"] >= 4]
    assert [names[-1] for names in split.names[1]] == stage_ends
    with torch.no_grad():
        model.eval()
        widths = [h.shape[1] for h in split.block_outputs(x)]
    assert widths == [f["num_chs"] for f in model.feature_info if f["reduction"] >= 4]


@pytest.mark.parametrize("name", MODELS)
def test_bwrf_trains_a_quantized_timm_model(name: str):
    fp = _model(name, 0)
    lp = bwrf_ext.quantize_model(fp, w_bits=4, a_bits=4)
    x, y = _batch()
    bwrf = BWRF(lp, fp).train()
    out = bwrf(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.mp_logits) == {1, 2, 3}
    first_stage = bwrf.lp_split.blocks[0]
    assert all(p.grad is not None for p in first_stage.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MODELS)
def test_blockkd_distills_between_two_timm_models(name: str):
    student, teacher = _model(name, 0), _model(name, 1)
    x, y = _batch()
    blockkd = BlockKD(student, teacher, example_input=x).train()
    out = blockkd(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.stone_logits) == {1, 2, 3, 4}
    assert all(c.conv.weight.grad is not None for c in blockkd.connectors.values())


@pytest.mark.parametrize("name", MODELS)
def test_contsup_trains_a_timm_model_in_two_isolated_modules(name: str):
    model = _model(name, 0)
    x, y = _batch()
    with warnings.catch_warnings():  # no published split table for timm models: computed one
        warnings.simplefilter("ignore")
        contsup = ContSup(model, ContSupConfig(num_modules=2, context="R0"), example_input=x)
    contsup.train()
    out = contsup.train_step(x, y)
    assert torch.isfinite(out.loss) and len(out.module_losses) == 2
    assert all(p.grad is not None for p in contsup.heads.parameters())


def test_timm_model_names_are_checked():
    assert model_name_problem("timm:resnet18") is None
    assert "not a timm model" in model_name_problem("timm:resnet9000")
    with pytest.raises(ValueError, match="model 'timm:nope' is not a timm model name"):
        build_model("timm:nope", ImageShape(3, 32, 32, 10))


def test_bwrf_train_runs_a_timm_model(tmp_path):
    """--model timm:<name> end to end: FP on digits (1-channel 8x8 images), then BWRF from it."""
    from bwrf_ext.train import main

    common = ["--model", "timm:resnet18", "--epochs", "1", "--train-subset", "256",
              "--test-subset", "100", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "fp")]) == 0
    assert main([*common, "--method", "bwrf", "--w-bits", "2", "--a-bits", "2", "--init-from",
                 str(tmp_path / "fp"), "--out", str(tmp_path / "bwrf")]) == 0  # fmt: skip
    summary = (tmp_path / "bwrf" / "metrics.jsonl").read_text()
    assert '"acc_mp3"' in summary and '"acc_fp"' in summary
