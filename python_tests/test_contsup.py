"""Tests of ContSup: per-module gradients against plain autograd, splits, context, losses, costs,
and the published preset against the public code's heads and tables."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bwrf_ext import quantize_model
from bwrf_ext.losses import supervised_contrastive_loss
from bwrf_ext.methods.contsup import ContSup, ContSupConfig
from bwrf_ext.methods.contsup.modules import AuxHead
from bwrf_ext.methods.contsup.splits import (
    INFOPRO_BALANCED_SPLITS,
    INFOPRO_BALANCED_SPLITS_STL10,
    INFOPRO_SPLITS,
    PUBLISHED_BALANCED_LOSS_WEIGHTS,
    PUBLISHED_LOSS_WEIGHTS,
    balanced_split,
    even_split,
    published_loss_weights,
)
from bwrf_ext.models import cifar_resnet, resnet20, resnet32
from bwrf_ext.nn.quantizer import LSQQuantizer

SHAPE = (4, 3, 16, 16)
MODES = ("R0", "E", "R1", "R2", "R1E")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module's tests.

    Batches of 2-4 images gain nothing from threads, and on CPU cores shared with other jobs
    every OpenMP barrier stalls: this module took 12 s with 1 thread and 345 s with 2 there.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int = 1, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Two samples per class, so that every SupCon anchor has a positive.
    labels = torch.arange(shape[0]) % (shape[0] // 2)
    return torch.randn(shape, generator=gen), labels


def _contsup(config: ContSupConfig, seed: int = 0, model: nn.Module | None = None) -> ContSup:
    torch.manual_seed(seed)
    return ContSup(model if model is not None else resnet32(), config).train()


# --- the oracle: the model's forward written out with its own modules, nothing detached ---


def _units(model: nn.Module) -> tuple[list, list[list[nn.Parameter]], Callable]:
    """(unit functions, each unit's parameters, head function) of a CIFAR ResNet."""
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]

    def stem(v):
        return F.relu(model.bn1(model.conv1(v)))

    def head(v):
        return model.linear(v.mean((2, 3)))

    params = [[*model.conv1.parameters(), *model.bn1.parameters()]]
    params += [list(b.parameters()) for b in blocks]
    return [stem, *blocks], params, head


def _unit_index(position: tuple[int, int], per_stage: int) -> int:
    stage, block = position
    return 0 if stage == 0 else 1 + (stage - 1) * per_stage + block


def _lerp(pair: tuple[float, float], m: int, k: int) -> float:
    return pair[0] + (pair[1] - pair[0]) * ((m - 1) / (k - 2) if k > 2 else 0.0)


def _oracle_grads(
    cs: ContSup, x, y, m: int, n_recent: int, use_image: bool
) -> dict[int, torch.Tensor]:
    """Gradients of module m's loss alone, through every earlier module (nothing detached)."""
    config, model = cs.config, cs.model
    units, _, head = _units(model)
    k = cs.num_modules
    ends = [_unit_index(p, len(model.layer1)) for p in cs.boundaries]
    cs.zero_grad(set_to_none=True)
    inputs, h, start = [x], x, 0
    for j in range(1, m + 1):
        stop = ends[j - 1] + 1 if j < k else len(units)
        for u in range(start, stop):
            h = units[u](h)
        start = stop
        if j == m:
            break
        size = h.shape[-2:]
        projector = cs.context[j - 1]
        context = h
        if use_image:
            context = context + F.adaptive_avg_pool2d(projector.image(x), size)
        sources = [inputs[i] for i in range(j - 1, -1, -1) if not (use_image and i == 0)]
        for encoder, source in zip(projector.recent, sources[:n_recent], strict=True):
            context = context + F.adaptive_avg_pool2d(encoder(source), size)
        h = context
        inputs.append(h)
    if m == k:
        loss = F.cross_entropy(head(h), y)
    else:
        out = cs.heads[m - 1](h)
        if config.local_loss == "ce":
            local = F.cross_entropy(out, y)
        else:
            local = supervised_contrastive_loss(out, y, config.supcon_temperature)
        loss = _lerp(config.local_weights, m, k) * local
        if config.reconstruction:
            mean = torch.tensor(config.image_mean).view(1, -1, 1, 1)
            std = torch.tensor(config.image_std).view(1, -1, 1, 1)
            target = (x * std + mean).clamp(0, 1)
            recon = torch.sigmoid(cs.decoders[m - 1](h, x.shape[-2:]))
            loss = loss + _lerp(config.recon_weights, m, k) * F.binary_cross_entropy(recon, target)
    loss.backward()
    return {id(p): p.grad.clone() for p in cs.parameters() if p.grad is not None}


ISOLATION_CASES = {
    "R0-ce": ContSupConfig(num_modules=4, context="R0", local_loss="ce"),
    # the published preset: SupCon, capped heads, the resnet32 K=4 table's weights
    "E-published-recon": ContSupConfig(num_modules=4, context="E", reconstruction=True),
    "R2-supcon-recon": ContSupConfig(num_modules=4, context="R2", local_loss="supcon",
                                     reconstruction=True, recon_weights=(2.0, 0.5),
                                     local_weights=(0.5, 1.5)),
    "R1E-ce": ContSupConfig(num_modules=4, context="R1E", local_loss="ce", preset="uniform"),
}


@pytest.fixture(scope="module", params=list(ISOLATION_CASES))
def isolation(request):
    """(ContSup, grads of one train_step, oracle grads per module m, mode) for one case."""
    config = ISOLATION_CASES[request.param]
    cs = _contsup(config)
    x, y = _batch()
    cs.train_step(x, y)  # no optimizer: the gradients stay in .grad
    step_grads = {id(p): p.grad.clone() for p in cs.parameters()}
    n_recent = int(config.context[1]) if config.context.startswith("R") else 0
    use_image = config.context.endswith("E")
    oracle = {m: _oracle_grads(cs, x, y, m, n_recent, use_image)
              for m in range(1, cs.num_modules + 1)}
    return cs, step_grads, oracle


def _module_params(cs: ContSup, m: int) -> list[nn.Parameter]:
    """Module m's parameters in the main net (the test's own unit mapping) and its aux parts."""
    _, unit_params, _ = _units(cs.model)
    ends = [_unit_index(p, len(cs.model.layer1)) for p in cs.boundaries]
    start = ends[m - 2] + 1 if m > 1 else 0
    stop = ends[m - 1] + 1 if m < cs.num_modules else len(unit_params)
    params = [p for unit in unit_params[start:stop] for p in unit]
    if m == cs.num_modules:
        params += list(cs.model.linear.parameters())
    else:
        params += list(cs.heads[m - 1].parameters())
        if cs.config.reconstruction:
            params += list(cs.decoders[m - 1].parameters())
    return params


def test_no_gradient_crosses_a_module_boundary(isolation):
    """Each module's grads from train_step equal those of its own loss alone (plain autograd)."""
    cs, step_grads, oracle = isolation
    assert {id(p) for p in cs.model.parameters()} <= step_grads.keys()
    for m in range(1, cs.num_modules + 1):
        params = _module_params(cs, m)
        assert params
        for p in params:
            torch.testing.assert_close(step_grads[id(p)], oracle[m][id(p)], rtol=1e-4, atol=1e-6,
                                       msg=f"module {m}")
        if m > 1:  # the oracle's loss does reach the earlier module: the check can fail
            earlier = _module_params(cs, m - 1)
            assert any(oracle[m].get(id(p)) is not None and oracle[m][id(p)].abs().sum() > 0
                       for p in earlier)


def test_context_projector_learns_only_from_the_next_module(isolation):
    cs, step_grads, oracle = isolation
    if cs.config.context == "R0":
        assert not list(cs.context.parameters())
        return
    for i, projector in enumerate(cs.context):  # projector i feeds module i + 2
        params = list(projector.parameters())
        assert params
        for p in params:
            torch.testing.assert_close(step_grads[id(p)], oracle[i + 2][id(p)], rtol=1e-4,
                                       atol=1e-6, msg=f"projector {i}")
            for m in range(1, i + 2):  # no loss before its module reaches it
                assert id(p) not in oracle[m]
        if i + 3 <= cs.num_modules:  # the later loss reaches it without the detach
            assert any(oracle[i + 3][id(p)].abs().sum() > 0 for p in params)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_k1_step_equals_plain_end_to_end_step(momentum):
    torch.manual_seed(0)
    net = resnet32()
    plain = copy.deepcopy(net).train()
    cs = ContSup(net, ContSupConfig(num_modules=1)).train()
    assert cs.boundaries == () and not list(cs.heads) and not list(cs.context)
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=momentum,
                                      weight_decay=1e-3)
    for step in range(2):
        xb, yb = _batch(seed=step)
        out = cs.train_step(xb, yb, optimizer)
        plain_optimizer.zero_grad()
        logits = plain(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        plain_optimizer.step()
        torch.testing.assert_close(out.logits, logits.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, got), want in zip(net.state_dict().items(), plain.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    assert len(out.module_losses) == 1 and out.losses.keys() == {"final_ce"}


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("mode", MODES)
def test_all_modes_train_every_part_on_resnet32(k: int, mode: str):
    cs = _contsup(ContSupConfig(num_modules=k, context=mode))
    assert cs.num_modules == k and cs.boundaries == INFOPRO_SPLITS["resnet32"][k]
    before = {n: p.detach().clone() for n, p in cs.named_parameters()}
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.05)
    x, y = _batch()  # the default SupCon loss needs positives and negatives to have a gradient
    out = cs.train_step(x, y, optimizer)
    assert out.logits.shape == (4, 10) and not out.logits.requires_grad
    assert sorted(out.local_outputs) == list(range(1, k))
    assert all(v.shape == (4, 128) for v in out.local_outputs.values())  # SupCon embeddings
    assert len(out.module_losses) == k and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, torch.stack(out.module_losses).sum())
    for name, p in cs.named_parameters():  # model, heads and projectors all learned
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert not torch.equal(p.detach(), before[name]), name
    n_context = sum(p.numel() for p in cs.context.parameters())
    assert (n_context == 0) == (mode == "R0")
    cs.eval()
    with torch.no_grad():
        assert torch.isfinite(cs(x)).all()


def test_forward_is_the_model_with_context_added():
    """R0: exactly the model's forward; E: the written-out sum at the boundary."""
    torch.manual_seed(0)
    x, _ = _batch()
    plain = ContSup(resnet32(), ContSupConfig(num_modules=8, context="R0")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain.model(x))
    cs = ContSup(resnet32(), ContSupConfig(num_modules=2, context="E")).eval()
    model = cs.model
    with torch.no_grad():
        for projector in cs.context:  # a fresh BN has beta 0; shift it so context is not ~0
            projector.image[-2].bias.fill_(0.5)
        h = model.layer1(F.relu(model.bn1(model.conv1(x))))
        h = model.layer2[:2](h)  # the K=2 table ends module 1 after (2, 1)
        h = h + F.adaptive_avg_pool2d(cs.context[0].image(x), h.shape[-2:])
        want = model.linear(model.layer3(model.layer2[2:](h)).mean((2, 3)))
        torch.testing.assert_close(cs(x), want)
        assert not torch.allclose(cs(x), model(x))


def test_recent_inputs_feed_rn_projectors():
    """R2 takes the inputs of the last two modules (the image too); R2E leaves the image to E."""
    cs = _contsup(ContSupConfig(num_modules=4, context="R2"))
    widths = [[enc[0].in_channels for enc in p.recent] for p in cs.context]
    # module inputs: image (3), then the K=4 boundaries (1,2) -> 16, (2,1) -> 32, (3,0) -> 64
    assert widths == [[3], [16, 3], [32, 16]]
    assert all(p.image is None for p in cs.context)
    cs = _contsup(ContSupConfig(num_modules=4, context="R2E"))
    assert [[enc[0].in_channels for enc in p.recent] for p in cs.context] == [[], [16], [32, 16]]
    assert all(p.image is not None for p in cs.context)


def test_loss_terms_weights_and_recombination():
    config = ContSupConfig(num_modules=5, split="even", reconstruction=True, local_loss="ce",
                           local_weights=(0.5, 2.0), recon_weights=(4.0, 1.0))
    cs = _contsup(config)
    x, y = _batch()
    out = cs.train_step(x, y)
    for m in range(1, 5):
        ratio = (m - 1) / 3
        assert out.loss_weights[f"module{m}_ce"] == pytest.approx(0.5 + 1.5 * ratio)
        assert out.loss_weights[f"module{m}_recon"] == pytest.approx(4.0 - 3.0 * ratio)
        torch.testing.assert_close(out.losses[f"module{m}_ce"],
                                   F.cross_entropy(out.local_outputs[m], y))
        assert 0 < out.losses[f"module{m}_recon"] < 5
        own = [k for k in out.losses if k.startswith(f"module{m}_")]
        torch.testing.assert_close(
            out.module_losses[m - 1], sum(out.loss_weights[k] * out.losses[k] for k in own)
        )
    assert out.loss_weights["final_ce"] == 1.0
    torch.testing.assert_close(out.module_losses[-1], out.losses["final_ce"])
    recombined = sum(out.loss_weights[k] * v for k, v in out.losses.items())
    torch.testing.assert_close(out.loss, recombined)


def test_supervised_contrastive_loss_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=gen)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # classes 2 and 3: anchors without positives
    for t, tb in ((0.07, 0.07), (0.5, 0.1)):
        zn = [[c / math.sqrt(sum(c * c for c in v)) for c in v] for v in z.double().tolist()]
        total = 0.0
        for i in range(7):
            dots = {a: sum(p * q for p, q in zip(zn[i], zn[a], strict=True)) / t
                    for a in range(7) if a != i}
            log_norm = math.log(sum(math.exp(d) for d in dots.values()))
            positives = [p for p in dots if y[p] == y[i]]
            if positives:
                total += -(t / tb) * sum(dots[p] - log_norm for p in positives) / len(positives)
        expected = torch.tensor(total / 7, dtype=torch.float64)
        got = supervised_contrastive_loss(z, y, t, tb)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_split_tables():
    """Published equal-layer resnet32 tables are the even split; every entry fits its model."""
    for k, positions in INFOPRO_SPLITS["resnet32"].items():
        assert [(0, 0) if u == 0 else (1 + (u - 1) // 5, (u - 1) % 5)
                for u in even_split(16, k)] == list(positions)
    for table in (INFOPRO_SPLITS, INFOPRO_BALANCED_SPLITS, INFOPRO_BALANCED_SPLITS_STL10):
        for arch, entries in table.items():
            per_stage = (int(arch[6:]) - 2) // 6
            for k, positions in entries.items():
                ends = [_unit_index(p, per_stage) for p in positions]
                assert len(ends) == k - 1 and ends == sorted(set(ends)), (arch, k)
                assert all(0 <= b < per_stage and (s > 0 or b == 0) for s, b in positions)
                assert ends[-1:] < [3 * per_stage]  # the last module holds at least one block
    assert set(INFOPRO_SPLITS["resnet110"]) >= {1, 2, 4, 8, 16}
    assert set(INFOPRO_BALANCED_SPLITS["resnet32"]) >= {1, 2, 4, 8, 16}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_balanced_split_minimises_the_largest_module(k: int):
    costs = [7.0, 1.0, 3.0, 9.0, 2.0, 2.0, 5.0, 4.0, 1.0]

    def worst(ends):
        bounds = [0, *[e + 1 for e in ends], len(costs)]
        return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))

    best = min(worst(list(c)) for c in itertools.combinations(range(len(costs) - 1), k - 1))
    ends = balanced_split(costs, k)
    assert len(ends) == k - 1 and ends == sorted(set(ends)) and worst(ends) == best


def test_resnet110_tables_and_fallbacks():
    cs = ContSup(cifar_resnet(110), ContSupConfig(num_modules=16))
    assert cs.boundaries == INFOPRO_SPLITS["resnet110"][16]
    cs = ContSup(cifar_resnet(110), ContSupConfig(num_modules=4, split="infopro_balanced"))
    assert cs.boundaries == INFOPRO_BALANCED_SPLITS["resnet110"][4]
    # STL-10's own balanced K=3 (networks_dev/configs.py, `iso_module_loc_for_memory_balance`)
    cs = ContSup(cifar_resnet(110), ContSupConfig(num_modules=3, split="infopro_balanced",
                                                  table_dataset="stl10"))
    assert cs.boundaries == ((1, 8), (2, 1))
    with pytest.warns(UserWarning, match="no published 'infopro_balanced' split"):
        cs = ContSup(cifar_resnet(110), ContSupConfig(num_modules=8, split="infopro_balanced"))
    assert cs.split_source == "balanced" and len(cs.boundaries) == 7
    # stage 1 holds the largest activations, so balancing puts more boundaries there
    assert sum(s == 1 for s, _ in cs.boundaries) > sum(s == 3 for s, _ in cs.boundaries)
    with pytest.warns(UserWarning, match="no published 'infopro' split for resnet20"):
        cs = ContSup(resnet20(), ContSupConfig(num_modules=4))
    assert cs.split_source == "even" and cs.num_modules == 4


def test_user_split_and_head_only_last_module():
    cs = _contsup(ContSupConfig(split=((1, 4), (3, 4)), context="R1"))
    assert cs.num_modules == 3 and cs.split_source == "user"
    x, y = _batch()
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.1)
    out = cs.train_step(x, y, optimizer)  # module 3 is GAP + linear on the context-added input
    assert len(out.module_losses) == 3
    assert all(p.grad is not None for p in cs.parameters())
    assert [p for p in cs.module_parameters(3)] == list(cs.model.linear.parameters())


def test_torchvision_resnet_with_an_even_split():
    """Any model the engine splits: torchvision's ResNet-18 (stages of 2 blocks), K=5, R1E."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    example = torch.randn(2, 3, 64, 64)
    cs = ContSup(net, ContSupConfig(num_modules=5, split="even", context="R1E"),
                 example_input=example).train()
    assert cs.boundaries == ((1, 0), (2, 0), (3, 0), (4, 0))  # 9 units: stem + 8 blocks
    # the published head rule generalised: double at stride 2 up to the final width (512)
    assert [_convs(h) for h in cs.heads] == [[(64, 128, 2)], [(128, 256, 2)], [(256, 512, 2)],
                                             [(512, 512, 1)]]
    out = cs.train_step(example, torch.tensor([0, 4]), torch.optim.SGD(cs.parameters(), lr=0.01))
    assert out.logits.shape == (2, 5) and len(out.module_losses) == 5
    assert all(p.grad is not None for p in cs.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aux_head": "1c0f"}, "aux_head must look like"),
        ({"aux_head": "conv"}, "aux_head must look like"),
        ({"context": "R0E"}, "context must be"),
        ({"context": "X1"}, "context must be"),
        ({"split": "infopro2"}, "split must be"),
        ({"num_modules": 0}, "num_modules must be an int >= 1"),
        ({"num_modules": 3, "split": ((1, 1),)}, "num_modules=3 but split has 1"),
        ({"local_loss": "mse"}, "local_loss must be"),
        ({"local_weights": (1.0, -1.0)}, "local_weights must be"),
        ({"encoder_resolution": "half"}, "encoder_resolution must be"),
        ({"preset": "paper"}, "preset must be 'published' or 'uniform'"),
        ({"aux_channel_cap": "max"}, "aux_channel_cap must be"),
        ({"aux_channel_cap": 0}, "aux_channel_cap must be"),
        ({"recon_weights": (1.0,)}, "recon_weights must be"),
        ({"table_dataset": ""}, "table_dataset must be"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContSupConfig(**kwargs)


def test_construction_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"num_modules must be in \[1, 16\]"):
        ContSup(resnet32(), ContSupConfig(num_modules=17))
    with pytest.raises(ValueError, match=r"positions \[\(1, 7\)\] do not exist"):
        ContSup(resnet32(), ContSupConfig(split=((1, 7),)))
    with pytest.raises(ValueError, match="strictly increasing"):
        ContSup(resnet32(), ContSupConfig(split=((2, 0), (1, 0))))


def test_aux_head_grammar_and_public_channel_cap():
    head = AuxHead(16, "2c3f", 10)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(16, 32, (2, 2)),
                                                                         (32, 32, (1, 1))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32, 128), (128, 128),
                                                                       (128, 10)]
    assert head(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    capped = AuxHead(64, "1c2f", 10, channel_cap=64)  # the public 64-channel head
    conv = next(m for m in capped.modules() if isinstance(m, nn.Conv2d))
    assert (conv.out_channels, conv.stride) == (64, (1, 1))
    probe = AuxHead(32, "0c1f", 10)
    assert [type(m) for m in probe.net] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]


def test_parameters_and_state_cover_every_part():
    cs = _contsup(ContSupConfig(num_modules=4, context="R1E", reconstruction=True))
    parts = [cs.model, cs.heads, cs.decoders, cs.context]
    expected = [id(p) for part in parts for p in part.parameters()]
    assert sorted(id(p) for p in cs.parameters()) == sorted(expected)
    assert len(expected) == len(set(expected))
    prefixes = {k.split(".")[0] for k in cs.state_dict()}
    assert prefixes == {"model", "heads", "decoders", "context"}
    assert all(len(part) == 3 for part in parts[1:])


def test_cost_report_matches_torch_flop_counter():
    cs = _contsup(ContSupConfig(num_modules=8, context="R1E"))
    report = cs.cost_report((1, 3, 32, 32))
    x = torch.zeros(1, 3, 32, 32)
    cs.eval()
    for fn, want in ((cs.model, report.main.macs), (cs, report.inference.macs)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn(x)
        assert counter.get_total_flops() == 2 * want
    assert report.main.params == sum(p.numel() for p in cs.model.parameters())
    assert report.context.params == sum(p.numel() for p in cs.context.parameters()) > 0
    assert report.aux_heads.params == sum(p.numel() for p in cs.heads.parameters())
    assert report.aux_heads.macs > 0 and report.decoders == type(report.decoders)(0, 0)
    assert 60e6 < report.main.macs < 75e6  # ResNet-32 at 32x32: ~69 MMACs
    assert "context projectors" in report.table()
    # pooling the image first cuts the image encoders' MACs by the boundary's area ratio
    cheap = _contsup(ContSupConfig(num_modules=8, context="E", encoder_resolution="boundary"))
    full = _contsup(ContSupConfig(num_modules=8, context="E"))
    assert cheap.cost_report().context.macs < full.cost_report().context.macs / 2


def test_quantized_model_trains_and_probe_leaves_quantizers_uninitialised():
    torch.manual_seed(0)
    net = quantize_model(resnet32(), w_bits=4, a_bits=4)
    quantizers = [m for m in net.modules() if isinstance(m, LSQQuantizer)]
    waiting = [q for q in quantizers if not q.is_initialized]  # the activation quantizers
    assert len(waiting) > 30
    cs = ContSup(net, ContSupConfig(num_modules=4, context="E"))
    cs.cost_report()
    assert not any(q.is_initialized for q in waiting) and all(q.enabled for q in quantizers)
    x, y = _batch()
    cs.train()
    with torch.no_grad():
        net(x)  # LSQ init on a real batch
    plain, head = copy.deepcopy(net), copy.deepcopy(cs.heads[0])
    optimizer = torch.optim.SGD(cs.parameters(), lr=0.01)
    out = cs.train_step(x, y, optimizer)
    assert torch.isfinite(out.loss) and len(out.module_losses) == 4
    assert all(q.scale.grad is not None and q.scale.grad.abs().sum() > 0 for q in quantizers)
    # the first module (stem, layer1[0..2]) got its own local loss's gradient only: equal to
    # one backward of that loss on the model's own forward
    plain.train()
    h = plain.layer1[:3](F.relu(plain.bn1(plain.conv1(x))))
    supervised_contrastive_loss(head(h), y).backward()  # the default local loss, weight 1
    first = [*net.conv1.parameters(), *net.bn1.parameters(), *net.layer1[:3].parameters()]
    want = [*plain.conv1.parameters(), *plain.bn1.parameters(), *plain.layer1[:3].parameters()]
    for p, q in zip(first, want, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


# --- the published preset against the public code (github.com/Tab-ct/ContSup) ---


def _convs(head: nn.Module) -> list[tuple[int, int, int]]:
    return [(c.in_channels, c.out_channels, c.stride[0]) for c in head.modules()
            if isinstance(c, nn.Conv2d)]


def _linears(head: nn.Module) -> list[tuple[int, int]]:
    return [(lin.in_features, lin.out_features) for lin in head.modules()
            if isinstance(lin, nn.Linear)]


# The public AuxClassifier's layers for every net_config and input width, as written out in
# networks_dev/auxiliary_nets.py (commit 072b03da), widen 1, feature_dim 128, loss_mode
# "contrast" (its default: 128 outputs): (convs as (in, out, stride), linears as (in, out)).
PUBLIC_HEADS = {
    ("0c1f", 16): ([], [(16, 128)]),
    ("0c1f", 32): ([], [(32, 128)]),
    ("0c1f", 64): ([], [(64, 128)]),
    ("0c2f", 16): ([], [(16, 128), (128, 128)]),
    ("0c2f", 32): ([], [(32, 128), (128, 128)]),
    ("0c2f", 64): ([], [(64, 128), (128, 128)]),
    ("1c1f", 16): ([(16, 32, 2)], [(32, 128)]),
    ("1c1f", 32): ([(32, 64, 2)], [(64, 128)]),
    ("1c1f", 64): ([(64, 64, 1)], [(64, 128)]),
    ("1c2f", 16): ([(16, 32, 2)], [(32, 128), (128, 128)]),
    ("1c2f", 32): ([(32, 64, 2)], [(64, 128), (128, 128)]),
    ("1c2f", 64): ([(64, 64, 1)], [(64, 128), (128, 128)]),
    ("1c3f", 16): ([(16, 32, 2)], [(32, 128), (128, 128), (128, 128)]),
    ("1c3f", 32): ([(32, 64, 2)], [(64, 128), (128, 128), (128, 128)]),
    ("1c3f", 64): ([(64, 64, 1)], [(64, 128), (128, 128), (128, 128)]),
    ("2c2f", 16): ([(16, 32, 2), (32, 32, 1)], [(32, 128), (128, 128)]),
    ("2c2f", 32): ([(32, 64, 2), (64, 64, 1)], [(64, 128), (128, 128)]),
    ("2c2f", 64): ([(64, 64, 1), (64, 64, 1)], [(64, 128), (128, 128)]),
}


@pytest.mark.parametrize("spec", ["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"])
def test_default_heads_are_the_public_heads(spec: str):
    """K=16 on ResNet-32 has boundaries of 16, 32 and 64 channels: every head as published."""
    cs = ContSup(resnet32(), ContSupConfig(num_modules=16, aux_head=spec))
    widths = [h.net[0].in_channels if _convs(h) else _linears(h)[0][0] for h in cs.heads]
    assert widths == [16] * 6 + [32] * 5 + [64] * 4
    for head, width in zip(cs.heads, widths, strict=True):
        assert (_convs(head), _linears(head)) == PUBLIC_HEADS[spec, width], (spec, width)
        bns = [m.num_features for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns == [out for _, out, _ in _convs(head)]


def test_head_widen_and_the_uniform_preset():
    # widen 2, public 1c2f: 16 -> int(32 * 2), 64 -> int(64 * 2) at stride 1, FC 256
    cs = ContSup(resnet32(), ContSupConfig(num_modules=16, aux_widen=2.0))
    assert (_convs(cs.heads[0]), _linears(cs.heads[0])) == ([(16, 64, 2)], [(64, 256),
                                                                             (256, 128)])
    assert (_convs(cs.heads[-1]), _linears(cs.heads[-1])) == ([(64, 128, 1)], [(128, 256),
                                                                               (256, 128)])
    # "uniform" (the earlier default): every head C -> 2C at stride 2, CE logits
    cs = ContSup(resnet32(), ContSupConfig(num_modules=16, preset="uniform"))
    assert (_convs(cs.heads[-1]), _linears(cs.heads[-1])) == ([(64, 128, 2)], [(128, 128),
                                                                               (128, 10)])
    assert cs.config.aux_channel_cap == "off" and cs.config.local_loss == "ce"
    # explicit options win over the preset
    cs = ContSup(resnet32(), ContSupConfig(num_modules=16, aux_channel_cap="off",
                                           local_loss="ce"))
    assert _convs(cs.heads[-1]) == [(64, 128, 2)] and _linears(cs.heads[-1])[-1] == (128, 10)
    cs = ContSup(resnet32(), ContSupConfig(num_modules=16, aux_channel_cap=32))
    assert [_convs(cs.heads[i]) for i in (0, 6, 14)] == [[(16, 32, 2)], [(32, 32, 1)],
                                                         [(64, 32, 1)]]


def test_default_local_loss_is_supcon_as_published():
    """The public default ("contrast"): SupCon at T = T_base = 0.07 on the head's 128 outputs."""
    cs = _contsup(ContSupConfig(num_modules=4))
    assert cs.config.local_loss == "supcon" and cs.config.preset == "published"
    assert (cs.config.supcon_temperature, cs.config.supcon_base_temperature) == (0.07, 0.07)
    x, y = _batch()
    out = cs.train_step(x, y)
    assert set(out.losses) == {"module1_supcon", "module2_supcon", "module3_supcon", "final_ce"}
    for m in range(1, 4):
        assert out.local_outputs[m].shape == (4, 128)
        assert out.loss_weights[f"module{m}_supcon"] == 1.0  # no decoder: unweighted, as there
        torch.testing.assert_close(out.losses[f"module{m}_supcon"],
                                   supervised_contrastive_loss(out.local_outputs[m], y, 0.07))


# The public loss weights, as written in networks_dev/configs.py (commit d0144a8d), dicts
# `local_loss_scale` (equal-layer runs) and `local_loss_scale_for_memory_balance`, keyed
# (arch, dataset, K); each entry is train.py's [ixx_1, ixy_1, ixx_2, ixy_2].
PUBLIC_LOSS_SCALE = {
    ("resnet32", "cifar10", 2): [5., 1., 0., 0.],
    ("resnet32", "cifar10", 4): [6., 0., 1., 2.],
    ("resnet32", "cifar10", 8): [5., 0., 0., 2.],
    ("resnet32", "cifar10", 16): [5., 0.05, 0.2, 0.5],
    ("resnet110", "cifar10", 2): [5., 0.5, 0., 0.],
    ("resnet110", "cifar10", 4): [1., 0., 0., 1.],
    ("resnet110", "cifar10", 8): [5., 0., 0., 1.],
    ("resnet110", "cifar10", 16): [5., 0., 0.5, 1.],
    ("resnet110", "stl10", 2): [10., 1., 0., 0.],
    ("resnet110", "stl10", 4): [20., 0.2, 5., 2.],
    ("resnet110", "stl10", 8): [20., 0.2, 5., 1.],
    ("resnet110", "stl10", 16): [20., 0.5, 10., 0.1],
    ("resnet110", "svhn", 2): [1., 0.1, 0., 0.],
    ("resnet110", "svhn", 4): [5., 0., 0.5, 0.],
    ("resnet110", "svhn", 8): [5., 0., 0.5, 2.],
    ("resnet110", "svhn", 16): [5., 0.2, 0.5, 1.],
}
PUBLIC_LOSS_SCALE_BALANCED = {
    ("resnet32", "cifar10", 2): [5., 0.1, 0., 0.],
    ("resnet32", "cifar10", 3): [5., 0, 5., 0.1],
    ("resnet32", "cifar10", 4): [5., 0., 0., 0.1],
    ("resnet32", "cifar10", 8): [5., 0., 0., 2.],
    ("resnet110", "cifar10", 2): [5., 0.1, 0., 0.],
    ("resnet110", "cifar10", 3): [5., 0, 5., 0.1],
    ("resnet110", "cifar10", 4): [5., 0., 0., 0.1],
}


def _public_module_weights(scale: list[float], k: int) -> list[tuple[float, float]]:
    """(local, recon) weight of each local module, as the public ResNet.forward computes them."""
    ixx_1, ixy_1, ixx_2, ixy_2 = scale
    weights = []
    for i in range(k - 1):  # its local_module_i, 0-based
        ratio = i / (k - 2) if k > 2 else 0
        weights.append((ixy_1 * (1 - ratio) + ixy_2 * ratio, ixx_1 * (1 - ratio) + ixx_2 * ratio))
    return weights


def _assert_weights(got: list, want: list, msg: str = "") -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12,
                               msg=msg)


@pytest.mark.parametrize("balanced", [False, True], ids=["equal-layer", "memory-balanced"])
def test_published_loss_weights_match_the_public_tables(balanced: bool):
    public = PUBLIC_LOSS_SCALE_BALANCED if balanced else PUBLIC_LOSS_SCALE
    ours = PUBLISHED_BALANCED_LOSS_WEIGHTS if balanced else PUBLISHED_LOSS_WEIGHTS
    assert {(a, d, k) for a, ds in ours.items() for d, ks in ds.items() for k in ks} == set(public)
    split = "infopro_balanced" if balanced else "infopro"
    for (arch, dataset, k), scale in public.items():
        assert published_loss_weights(arch, dataset, k, balanced) is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cs = ContSup(cifar_resnet(int(arch[6:])),
                         ContSupConfig(num_modules=k, split=split, table_dataset=dataset,
                                       reconstruction=True),
                         example_input=torch.zeros(2, 3, 8, 8))
        assert not [w for w in caught if "loss weights" in str(w.message)], (arch, dataset, k)
        assert cs.weights_source.startswith("published"), cs.weights_source
        got = [cs.module_weights(m) for m in range(1, k)]
        _assert_weights(got, _public_module_weights(scale, k), f"{arch} {dataset} K={k}")


def test_published_weights_reach_the_loss_and_apply_only_with_the_decoder():
    x, y = _batch()
    cs = _contsup(ContSupConfig(num_modules=4, context="R0", reconstruction=True))
    out = cs.train_step(x, y)  # resnet32 K=4: [6, 0, 1, 2]
    for m, (local, recon) in enumerate(_public_module_weights([6., 0., 1., 2.], 4), 1):
        assert out.loss_weights[f"module{m}_supcon"] == pytest.approx(local)
        assert out.loss_weights[f"module{m}_recon"] == pytest.approx(recon)
    assert out.loss_weights["module1_supcon"] == 0.0  # the first module learns from the decoder
    # Without the decoder the public code uses loss_ixy alone: every local weight 1.
    cs = ContSup(resnet32(), ContSupConfig(num_modules=16))
    assert [cs.module_weights(m)[0] for m in range(1, 16)] == [1.0] * 15
    # Explicit weights win, with or without the decoder; the uniform preset is flat.
    cs = ContSup(resnet32(), ContSupConfig(num_modules=4, local_weights=(0.5, 2.0)))
    assert [cs.module_weights(m)[0] for m in (1, 2, 3)] == [0.5, 1.25, 2.0]
    cs = ContSup(resnet32(), ContSupConfig(num_modules=4, reconstruction=True,
                                           recon_weights=(3.0, 3.0)))
    assert [cs.module_weights(m) for m in (1, 3)] == [(0.0, 3.0), (2.0, 3.0)]
    cs = ContSup(resnet32(), ContSupConfig(num_modules=4, reconstruction=True, preset="uniform"))
    assert [cs.module_weights(m) for m in (1, 2, 3)] == [(1.0, 1.0)] * 3
    # The resolved config is explicit: building from it again gives the same one.
    assert ContSup(resnet32(), cs.config).config == cs.config
    with pytest.raises(ValueError, match="use ContSup.module_weights"):
        ContSupConfig(num_modules=4).module_weights(1)


def _weight_warnings(build: Callable[[], ContSup]) -> tuple[ContSup, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs = build()
    return cs, [str(w.message) for w in caught if "loss weights" in str(w.message)]


def test_untabled_weights_fall_back_with_one_warning():
    # resnet32 K=3: an equal-layer split but no weights -> flat (1, 1)
    cs, caught = _weight_warnings(
        lambda: ContSup(resnet32(), ContSupConfig(num_modules=3, reconstruction=True)))
    assert len(caught) == 1 and "(resnet32, cifar10, K=3)" in caught[0]
    assert [cs.module_weights(m) for m in (1, 2)] == [(1.0, 1.0)] * 2
    # resnet32 K=16 memory-balanced: its split is the equal-layer one, so are the weights
    cs, caught = _weight_warnings(lambda: ContSup(resnet32(), ContSupConfig(
        num_modules=16, split="infopro_balanced", reconstruction=True)))
    assert len(caught) == 1 and "equal-layer" in caught[0]
    _assert_weights([cs.module_weights(m) for m in range(1, 16)],
                    _public_module_weights([5., 0.05, 0.2, 0.5], 16))
    # another model, another data set: flat, one warning each
    for build in (lambda: ContSup(resnet20(), ContSupConfig(num_modules=4, reconstruction=True)),
                  lambda: ContSup(resnet32(), ContSupConfig(num_modules=4, reconstruction=True,
                                                            table_dataset="cifar100"))):
        cs, caught = _weight_warnings(build)
        assert len(caught) == 1 and cs.weights_source.startswith("flat")
    # no decoder, or both pairs given: the tables are not consulted, nothing to warn about
    for config in (ContSupConfig(num_modules=3),
                   ContSupConfig(num_modules=3, reconstruction=True, local_weights=(1.0, 1.0),
                                 recon_weights=(2.0, 2.0))):
        _, caught = _weight_warnings(lambda config=config: ContSup(resnet32(), config))
        assert caught == []
