"""Tests of the block engine: splits against the models' own forward, and batched branches."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from bwrf_ext import quantize_model
from bwrf_ext.engine import BlockSplit, FrozenPartner, register_split, split_model
from bwrf_ext.engine import split as split_module
from bwrf_ext.models import resnet20
from bwrf_ext.models.small import MLP, SmallCNN

PACKAGE = Path(__file__).resolve().parents[1] / "bwrf_ext"


def _with_bn_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Gives BatchNorm non-trivial running statistics (a fresh model's are 0/1), then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(shape) * 2 + 0.5)
    return model.eval()


def _quantized_resnet20() -> nn.Module:
    torch.manual_seed(0)
    lp = quantize_model(_with_bn_statistics(resnet20(), (8, 3, 16, 16)), w_bits=2, a_bits=2)
    with torch.no_grad():
        lp(torch.randn(8, 3, 16, 16))  # LSQ init of the activation step sizes
    return lp.eval()


MODELS = {
    # name: (factory, input shape, number of blocks, the model attributes of the blocks)
    "cifar_resnet20": (resnet20, (4, 3, 16, 16), 3, ["layer1", "layer2", "layer3"]),
    "cifar_resnet20_w2a2": (_quantized_resnet20, (4, 3, 16, 16), 3, ["layer1", "layer2", "layer3"]),
    "resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        (2, 3, 64, 64), 4, ["layer1", "layer2", "layer3", "layer4"],
    ),
    "resnet50": (
        lambda: torchvision.models.resnet50(num_classes=10),
        (2, 3, 64, 64), 4, ["layer1", "layer2", "layer3", "layer4"],
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64), 4, None,
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_automatic_split_equals_forward(name: str):
    factory, shape, num_blocks, attrs = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    if not name.endswith("w2a2"):
        model = _with_bn_statistics(model, shape)
    x = torch.randn(shape)
    split = split_model(model, example_input=x)
    assert split.num_blocks == num_blocks
    with torch.no_grad():
        # The split runs the same ops in the same order: bit-identical, not just close.
        assert torch.equal(split(x), model(x))
        outputs = split.block_outputs(x)
    assert len(outputs) == num_blocks
    if attrs is not None:  # the blocks are the model's own modules, not copies
        assert all(b is getattr(model, a) for b, a in zip(split.blocks, attrs, strict=True))
    else:
        assert [o.shape[1] for o in outputs] == [24, 32, 96, 1280]
        assert [o.shape[-1] for o in outputs] == [16, 8, 4, 2]  # stride 4, 8, 16, 32
    assert not model.training  # the check restored the flags


def test_split_trains_the_model_it_shares():
    model = resnet20()
    split = split_model(model)
    before = model.layer2[0].conv1.weight.detach().clone()
    split(torch.randn(2, 3, 16, 16)).sum().backward()
    torch.optim.SGD(split.parameters(), lr=0.1).step()
    assert not torch.equal(model.layer2[0].conv1.weight, before)


def small_sequential() -> nn.Sequential:
    """Three conv-BN-ReLU stages and a linear head as one nn.Sequential (numbered names)."""
    layers = []
    for cin, cout, stride in ((1, 32, 1), (32, 64, 2), (64, 64, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_named_split_of_a_sequential():
    torch.manual_seed(0)
    model = _with_bn_statistics(small_sequential(), (8, 1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    split = split_model(
        model, blocks=[["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"]], head=["9", "10", "11"],
        example_input=x,
    )
    assert split.num_blocks == 3
    with torch.no_grad():
        assert torch.equal(split(x), model(x))


def test_named_split_inserts_flatten_before_the_classifier():
    torch.manual_seed(0)
    model = _with_bn_statistics(torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    # torchvision's forward calls torch.flatten(x, 1) between avgpool and fc.
    split = split_model(
        model,
        blocks=[["layer1", "layer2"], "layer3", "layer4"],
        stem=["conv1", "bn1", "relu", "maxpool"],
        head=["avgpool", "fc"],
        example_input=x,
    )
    assert split.names[2] == ["avgpool", "flatten", "fc"]
    with torch.no_grad():
        assert torch.equal(split(x), model(x))


class _SkipNet(nn.Module):
    """A forward that is not a plain chain: a skip connection around two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.b(self.a(x))
        return self.fc(x.mean((2, 3)))


def test_named_split_errors():
    model = _SkipNet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="no automatic split for _SkipNet"):
        split_model(model)
    with pytest.raises(ValueError, match="differs from the model's forward|failed at the head"):
        split_model(model, blocks=["a", "b"], head=["fc"], example_input=x)
    with pytest.raises(ValueError, match="'c' is not a submodule"):
        split_model(model, blocks=["a", "c"], head=["fc"], example_input=x)
    with pytest.raises(ValueError, match=r"in no part: \['b'\]"):
        split_model(model, blocks=["a"], head=["fc"], example_input=x)
    with pytest.raises(ValueError, match="overlaps"):
        split_model(model, blocks=["a", "a"], head=["fc"], example_input=x)
    with pytest.raises(ValueError, match="needs example_input"):
        split_model(model, blocks=["a", "b"], head=["fc"])


def test_branches_batched_equal_naive_and_composition():
    """Batched and naive branches against the plain composition of the model's own modules."""
    torch.manual_seed(0)
    model = _with_bn_statistics(resnet20(), (8, 3, 16, 16))
    partner = FrozenPartner(model, split_model(model))
    h = partner.split.block_outputs(torch.randn(4, 3, 16, 16))
    base = {1: h[0], 2: h[1]}
    results = {}
    for batched in (True, False):
        entries = {k: v.detach().clone().requires_grad_() for k, v in base.items()}
        out = partner.branches(entries, batched=batched)
        sum(o.square().sum() for o in out.values()).backward()
        results[batched] = (out, {k: v.grad for k, v in entries.items()})
    entries = {k: v.detach().clone().requires_grad_() for k, v in base.items()}
    model.eval().requires_grad_(False)  # the oracle: the caller's model, frozen by hand
    pool = lambda t: t.mean((2, 3))  # noqa: E731
    expected = {
        1: model.linear(pool(model.layer3(model.layer2(entries[1])))),
        2: model.linear(pool(model.layer3(entries[2]))),
    }
    sum(o.square().sum() for o in expected.values()).backward()
    for batched in (True, False):
        out, grads = results[batched]
        for k in (1, 2):
            torch.testing.assert_close(out[k], expected[k], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grads[k], entries[k].grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_partner_stays_frozen_and_in_eval():
    model = resnet20()
    partner = FrozenPartner(model, split_model(model))
    assert not any(p.requires_grad for p in partner.model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the caller's model: untouched
    partner.model.train()
    partner.branches({2: torch.randn(2, 32, 8, 8)})
    assert not any(m.training for m in partner.model.modules())
    # The split runs the copy's modules, not the caller's.
    copied = {id(m) for m in partner.model.modules()}
    assert all(id(m) in copied for m in partner.split.blocks[0].modules())


def test_branches_reject_a_missing_block():
    model = resnet20()
    partner = FrozenPartner(model, split_model(model))
    with pytest.raises(ValueError, match=r"entry block must be in \[0, 3\], got 4"):
        partner.branches({4: torch.randn(2, 64, 4, 4)})


def test_a_branch_may_enter_at_the_head():
    torch.manual_seed(0)
    model = resnet20().eval()
    partner = FrozenPartner(model, split_model(model))
    entries = {2: torch.randn(3, 32, 8, 8), 3: torch.randn(2, 64, 4, 4)}
    with torch.no_grad():
        batched = partner.branches(entries, batched=True)
        naive = partner.branches(entries, batched=False)
        head_only = partner.split.head(entries[3])
        through_block_3 = partner.split.head(partner.split.blocks[2](entries[2]))
    torch.testing.assert_close(batched[3], head_only)
    torch.testing.assert_close(naive[3], head_only)
    torch.testing.assert_close(batched[2], through_block_3)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


ENGINE_FILES = sorted(str(f.relative_to(PACKAGE)) for f in (PACKAGE / "engine").glob("*.py"))


@pytest.mark.parametrize("file", [*ENGINE_FILES, "losses.py", "methods/bwrf.py"])
def test_engine_does_not_import_quantization(file: str):
    """Block-KD and ContSup reuse these files: nothing quantization-specific may come with them."""
    quantization = ("bwrf_ext.nn", "bwrf_ext.ops", "bwrf_ext.convert", "bwrf_ext.export",
                    "bwrf_ext.reference", "bwrf_ext._backend")
    imported = _imported_modules(PACKAGE / file)
    assert imported, file
    assert not [m for m in imported if m.startswith(quantization)]


@pytest.mark.parametrize("file", ENGINE_FILES)
def test_engine_imports_no_model(file: str):
    """Model families register their splits; the engine knows none of them (no import cycle)."""
    assert not [m for m in _imported_modules(PACKAGE / file) if m.startswith("bwrf_ext.models")]


def test_split_registry_picks_the_most_derived_family_and_lists_them_in_errors():
    class Special(SmallCNN):
        pass

    plain = SmallCNN()
    assert [len(b) for b in split_model(plain).blocks] == [3, 3, 3]  # the registered names
    register_split(Special, lambda m: BlockSplit(nn.Identity(), [m], nn.Identity()), "special")
    try:
        special = Special()
        assert split_model(special).blocks[0] is special  # its own rule, not SmallCNN's
        with pytest.raises(TypeError, match=r"no automatic split for MLP \(registered: ") as e:
            split_model(MLP())
        for family in ("CIFAR ResNets", "torchvision ResNets", "small CNN", "special"):
            assert family in str(e.value)
    finally:
        del split_module._REGISTRY[Special]


def test_block_split_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockSplit(nn.Identity(), [], nn.Identity())


def test_splitting_leaves_no_trace_on_an_uncalibrated_quantized_model():
    """The split check's forward must not initialise the step sizes (they would come from the
    example, not the calibration batch) nor move BatchNorm statistics nor the mode."""
    torch.manual_seed(0)
    model = quantize_model(resnet20(), 2, 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [m.input_quantizer for m in model.modules() if hasattr(m, "input_quantizer")]
    assert inputs and not any(q.is_initialized for q in inputs)  # set on the first batch
    split_model(model, example_input=torch.randn(2, 3, 32, 32))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training and all(m.training for m in model.modules())
    assert all(q.enabled and not q.is_initialized for q in inputs)
