"""attnfused.convert: every supported module type and configuration, the report, what is left
in place, state_dict identity, and real timm / torchvision models with random weights
(outputs, input and parameter gradients, BatchNorm statistics equal before and after,
in train and eval mode, float64)."""
from __future__ import annotations

import copy
import functools
import importlib
import io

import pytest
import torch
from torch import nn

import attnfused
from attnfused import reference as ref
from attnfused.variants import FusedCbam, FusedChannelConv, FusedChannelMLP, FusedSpatial
from tests._util import GRAD_TOLERANCE, TOLERANCE, rel_err

convert_mod = importlib.import_module("attnfused.convert")  # the module; attnfused.convert is the function

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import cbam as tcbam  # noqa: E402
from timm.layers import eca as teca  # noqa: E402
from timm.layers import squeeze_excite as tse  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite as EffSqueezeExcite  # noqa: E402
from torchvision.ops import SqueezeExcitation  # noqa: E402

DT = torch.float64


# ----------------------------------------------------------------------------- helpers

def randomize_(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (fresh ones would fold to identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


class ExactHardsigmoid(nn.Module):
    """nn.Hardsigmoid with a float64 backward: torch's scales the gradient by a float32 1/6 even
    for float64 tensors (about 3e-8 off), a bound loose enough to pass a float64 path run in float32."""

    def forward(self, x):
        return torch.nn.functional.relu6(x + 3) / 6


def exact_hardsigmoids_(model: nn.Module) -> nn.Module:
    """`model` with every nn.Hardsigmoid replaced by ExactHardsigmoid (same outputs, no parameters)."""
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.Hardsigmoid:
                setattr(m, child_name, ExactHardsigmoid())
    return model


def assert_close(out, ref_, tol, what):
    err = rel_err(out, ref_)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_same_training(original: nn.Module, converted: nn.Module, x: torch.Tensor, modes=("train", "eval")):
    """Forward, backward (random output gradient) and BatchNorm statistics agree, per mode, within
    the float64 bounds: the original's hard sigmoids take an exact backward (ExactHardsigmoid)."""
    for mode in modes:
        out_tol, grad_tol = TOLERANCE[x.dtype], GRAD_TOLERANCE[x.dtype]
        a, b = exact_hardsigmoids_(copy.deepcopy(original)), copy.deepcopy(converted)
        a.train(mode == "train")
        b.train(mode == "train")
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().clone().requires_grad_()
        seed = torch.seed()  # dropout / drop-path draw the same masks in both
        torch.manual_seed(seed)
        ya = a(xa)
        torch.manual_seed(seed)
        yb = b(xb)
        assert_close(yb, ya, out_tol, f"{mode} output")
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(xb.grad, xa.grad, grad_tol, f"{mode} input gradient")
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert pa.keys() == pb.keys()
        # gradients that are zero in exact arithmetic (e.g. a BatchNorm bias feeding another
        # BatchNorm) are rounding noise: measure each against the whole gradient's scale
        scale = torch.cat([p.grad.flatten() for p in pa.values() if p.grad is not None]).norm()
        for name, p in pa.items():
            if p.grad is None:
                assert pb[name].grad is None, name
                continue
            diff, denom = (pb[name].grad - p.grad).norm(), torch.maximum(p.grad.norm(), 1e-6 * scale)
            err = diff / denom if denom > 0 else diff  # all zero (every ReLU unit dead): must match exactly
            assert err <= grad_tol, f"{mode} gradient of {name}: relative error {err:.3e}"
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert_close(sb[k], sa[k], out_tol, f"{mode} state {k}")


FUSED_TYPES = (attnfused.variants._FusedVariant, attnfused.modules._FusedMixin)


def supported_types() -> tuple[type, ...]:
    return tuple(convert_mod._adapters())


def converted_ok(model: nn.Module, **kw):
    """convert with report; every entry converted and no supported module left behind."""
    out, entries = attnfused.convert(model, report=True, **kw)
    assert entries, "no attention module found"
    assert all(e.converted for e in entries), [str(e) for e in entries if not e.converted]
    fused = [n for n, m in out.named_modules() if isinstance(m, FUSED_TYPES)]
    inside = lambda n: any(n.startswith(f + ".") or f == "" for f in fused)  # noqa: E731 (the fused layers)
    left = [n for n, m in out.named_modules() if type(m) in supported_types() and not inside(n)]
    assert not left, f"supported modules left behind: {left}"
    return out, entries


# ----------------------------------------------------------------------------- module configurations

C = 32  # channels of the module tests
MODULE_CASES = {
    # timm SEModule
    "se": lambda: tse.SEModule(C),
    "se_maxpool": lambda: tse.SEModule(C, add_maxpool=True),
    "se_silu_hardsigmoid": lambda: tse.SEModule(C, act_layer=nn.SiLU, gate_layer="hard_sigmoid"),
    "se_nobias_rd": lambda: tse.SEModule(C, rd_channels=5, bias=False),
    # timm EffectiveSEModule (one layer)
    "ese": lambda: tse.EffectiveSEModule(C),
    "ese_maxpool_sigmoid": lambda: tse.EffectiveSEModule(C, add_maxpool=True, gate_layer="sigmoid"),
    # timm EcaModule / CecaModule
    "eca": lambda: teca.EcaModule(C),
    "eca_k5_hardsigmoid": lambda: teca.EcaModule(None, kernel_size=5, gate_layer="hard_sigmoid"),
    "ceca": lambda: teca.CecaModule(C),
    "ceca_k7": lambda: teca.CecaModule(None, kernel_size=7),
    # timm CBAM and halves
    "cbam": lambda: tcbam.CbamModule(C),
    "cbam_bias_silu_k3": lambda: tcbam.CbamModule(C, rd_ratio=1 / 4, spatial_kernel_size=3, act_layer=nn.SiLU,
                                                  mlp_bias=True),
    "cbam_hardsigmoid": lambda: tcbam.CbamModule(C, gate_layer="hard_sigmoid"),
    "lcbam": lambda: tcbam.LightCbamModule(C),
    "lcbam_bias_k5": lambda: tcbam.LightCbamModule(C, spatial_kernel_size=5, mlp_bias=True),
    "channel_attn": lambda: tcbam.ChannelAttn(C, mlp_bias=True),
    "light_channel_attn": lambda: tcbam.LightChannelAttn(C),
    "spatial_attn": lambda: tcbam.SpatialAttn(5),
    "light_spatial_attn": lambda: tcbam.LightSpatialAttn(3),
    # EfficientNet / MobileNet SE
    "effnet_se": lambda: EffSqueezeExcite(C, act_layer=nn.SiLU),
    "mbv3_se": lambda: EffSqueezeExcite(C, gate_layer="hard_sigmoid", rd_round_fn=round),
    "tv_se": lambda: SqueezeExcitation(C, 8),
    "tv_se_silu_hardsigmoid": lambda: SqueezeExcitation(C, 8, activation=nn.SiLU, scale_activation=nn.Hardsigmoid),
    # attnfused reference classes
    "ref_se_avg": lambda: ref.SEBlock("avg", C, 4),
    "ref_se_max": lambda: ref.SEBlock("max", C, 8),
    "ref_eca": lambda: ref.ECABlock(C),
    "ref_ca_fc": lambda: ref.ChannelAttentionFC(C, 4),
    "ref_ca_conv": lambda: ref.ChannelAttentionConv(C, 2, 1),
    "ref_spatial": lambda: ref.SpatialAttention(7),
    "ref_cbam_fc": lambda: ref.CBAMBlock("FC", 5, C, 4),
    "ref_cbam_conv": lambda: ref.CBAMBlock("Conv", 3, C, None, 2, 1),
}

FUSED_CLASS = {"se": FusedChannelMLP, "ese": FusedChannelMLP, "eca": FusedChannelConv, "ceca": FusedChannelConv,
               "cbam": FusedCbam, "lcbam": FusedCbam, "spatial_attn": FusedSpatial, "tv_se": FusedChannelMLP,
               "ref_cbam_fc": attnfused.CBAMBlock, "ref_se_max": attnfused.SEBlock}


def _input(n=3, c=C, h=9, w=7):
    return torch.randn(n, c, h, w, dtype=DT)


def _random_params_(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return randomize_(m)


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_module_parity(case):
    original = _random_params_(MODULE_CASES[case]()).to(DT)
    converted, entries = converted_ok(original)
    assert len(entries) == 1 and entries[0].path == "" and converted is not original
    if case in FUSED_CLASS:
        assert type(converted) is FUSED_CLASS[case]
    sd_a, sd_b = original.state_dict(), converted.state_dict()
    assert list(sd_a) == list(sd_b)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert_same_training(original, converted, _input())


@pytest.mark.parametrize("case", ["cbam", "spatial_attn", "lcbam"])
def test_spatial_batchnorm_running_stats_follow_modes(case):
    """Training-mode steps update the spatial BatchNorm exactly as the original; eval folds it."""
    original = _random_params_(MODULE_CASES[case]()).to(DT)
    converted = attnfused.convert(original)
    original.train()
    converted.train()
    for _ in range(3):
        x = _input()
        original(x)
        converted(x)
    for k, v in original.state_dict().items():
        assert_close(converted.state_dict()[k], v, TOLERANCE[DT], k)
    assert any("num_batches_tracked" in k and v.item() == 3 for k, v in converted.state_dict().items())
    original.eval()
    converted.eval()
    x = _input()
    assert_close(converted(x), original(x), TOLERANCE[DT], "eval output")


def test_spatial_batchnorm_without_running_stats():
    """track_running_stats=False: batch statistics in eval mode too, as BatchNorm does."""
    original = _random_params_(tcbam.CbamModule(C)).to(DT)
    original.spatial.conv.bn = nn.BatchNorm2d(1, track_running_stats=False).to(DT)
    converted, _ = converted_ok(original)
    assert_same_training(original, converted, _input())


def test_inplace_shares_parameters_and_keeps_optimizer():
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), tcbam.CbamModule(C), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = attnfused.convert(model, inplace=True)
    assert out is model and isinstance(model[1], FusedCbam)
    assert all(a is b for a, b in zip(params, model.parameters()))
    conv_w = model[1].spatial.conv.conv.weight
    before = conv_w.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(before, conv_w)  # the optimizer updated the fused module's weight


def test_not_inplace_leaves_model_alone():
    model = nn.Sequential(nn.Conv2d(3, C, 1), tse.SEModule(C))
    out = attnfused.convert(model)
    assert type(model[1]) is tse.SEModule and isinstance(out[1], FusedChannelMLP)
    assert all(a is not b for a, b in zip(model.parameters(), out.parameters()))


def test_convert_draws_nothing_from_the_rng():
    model = nn.Sequential(ref.CBAMBlock("FC", 7, C, 4), ref.ECABlock(C), tcbam.CbamModule(C))
    state = torch.get_rng_state()
    attnfused.convert(model)
    assert torch.equal(state, torch.get_rng_state())


def test_checkpoints_load_both_ways():
    model = randomize_(timm.create_model("test_resnet", block_args=dict(attn_layer="cbam")))
    fused = attnfused.convert(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = attnfused.convert(timm.create_model("test_resnet", block_args=dict(attn_layer="cbam")))
    fresh.load_state_dict(torch.load(buf))  # strict: same keys
    back = timm.create_model("test_resnet", block_args=dict(attn_layer="cbam"))
    back.load_state_dict(fused.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(back.state_dict()[k], v)


def test_backend_is_passed_and_checked():
    out = attnfused.convert(nn.Sequential(tse.SEModule(C), ref.SEBlock("avg", C, 4)), backend="reference")
    assert out[0].backend == "reference" and out[1].backend == "reference"
    with pytest.raises(ValueError, match="backend"):
        attnfused.convert(tse.SEModule(C), backend="nope")
    with pytest.raises(TypeError, match="model"):
        attnfused.convert("not a model")


def test_already_fused_and_subclasses_are_left_alone():
    class MySE(tse.SEModule):  # a subclass may change the forward: not ours to replace
        pass

    model = nn.Sequential(attnfused.SEBlock("avg", C, 4), MySE(C), attnfused.convert(tse.SEModule(C)))
    out, entries = attnfused.convert(model, report=True)
    assert entries == []
    assert [type(m) for m in out] == [type(m) for m in model]


# ----------------------------------------------------------------------------- left in place, with a reason

UNSUPPORTED = {
    "norm_layer": (lambda: tse.SEModule(C, norm_layer=nn.BatchNorm2d), "norm_layer"),
    "gelu_act": (lambda: tse.SEModule(C, act_layer=nn.GELU), "activation GELU"),
    "tanh_gate": (lambda: tse.SEModule(C, gate_layer="tanh"), "gate Tanh"),
    "eca_mlp": (lambda: teca.EcaModule(C, use_mlp=True), "use_mlp"),
    "ceca_bias": (lambda: teca.CecaModule(C, act_layer=nn.ReLU), "bias"),
    "tv_gelu": (lambda: SqueezeExcitation(C, 8, activation=nn.GELU), "activation GELU"),
    "cbam_relu6": (lambda: tcbam.CbamModule(C, act_layer=nn.ReLU6), "activation ReLU6"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_left_in_place_with_reason(case):
    make, reason = UNSUPPORTED[case]
    model = nn.Sequential(nn.Identity(), make())
    out, entries = attnfused.convert(model, report=True)
    assert type(out[1]) is type(model[1])
    assert not entries[0].converted and entries[0].path == "1"  # then the halves it holds, if any
    assert reason in entries[0].reason, entries[0].reason
    assert "left in place" in str(entries[0])


def test_unsupported_parent_converts_its_supported_halves():
    m = tcbam.CbamModule(C)
    m.spatial.conv.conv.padding_mode = "reflect"  # the spatial half cannot run fused, the channel half can
    out, entries = attnfused.convert(m, report=True)
    by_path = {e.path: e for e in entries}
    assert not by_path[""].converted and "padding" in by_path[""].reason
    assert by_path["channel"].converted and not by_path["spatial"].converted
    assert isinstance(out.channel, FusedChannelMLP)
    assert_same_training(m.to(DT), out.to(DT), _input())


def test_modified_reference_module_left_in_place():
    m = ref.SEBlock("avg", C, 4)
    m.fc_layers[1] = nn.SiLU()
    out, entries = attnfused.convert(m, report=True)
    assert type(out) is ref.SEBlock and not entries[0].converted and "SiLU" in entries[0].reason


def test_report_names_paths_and_types():
    model = timm.create_model("test_resnet", block_args=dict(attn_layer="se"))
    _, entries = converted_ok(model)
    attention, tails = [e for e in entries if not e.tail], [e for e in entries if e.tail]
    assert {e.path for e in attention} == {n for n, m in model.named_modules() if isinstance(m, tse.SEModule)}
    assert all(e.type == "timm.layers.squeeze_excite.SEModule" and e.replaced_by == "FusedChannelMLP"
               for e in attention)
    # and each residual block around them, its tail fused
    blocks = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in ("Bottleneck", "BasicBlock")}
    assert {e.path: e.replaced_by for e in tails} == {n: f"Timm{c}Tail" for n, c in blocks.items()}


def test_include_picks_what_is_converted():
    """include turns modules down by (path, module): they stay in place, with a reason, and the
    children of a turned-down parent are still visited; the outputs stay the original's."""
    model = nn.Sequential(tse.SEModule(C), tcbam.CbamModule(C), teca.EcaModule(C)).to(DT)
    x = torch.randn(2, C, 6, 5, dtype=DT)
    only_cbam = lambda path, m: isinstance(m, tcbam.CbamModule)  # noqa: E731
    out, entries = attnfused.convert(model, report=True, include=only_cbam)
    assert [(e.path, e.converted) for e in entries] == [("0", False), ("1", True), ("2", False)]
    assert all("include" in e.reason for e in entries if not e.converted)
    assert type(out[0]) is tse.SEModule and isinstance(out[1], FusedCbam) and type(out[2]) is teca.EcaModule
    assert_close(out(x), model(x), TOLERANCE[DT], "include=CBAM only")
    # a turned-down CBAM: its halves are visited and converted on their own
    halves, entries = attnfused.convert(model[1], report=True, include=lambda path, m: path != "")
    assert [(e.path, e.converted) for e in entries] == [("", False), ("channel", True), ("spatial", True)]
    assert type(halves) is tcbam.CbamModule
    assert_close(halves(x), model[1](x), TOLERANCE[DT], "CBAM halves")
    with pytest.raises(TypeError, match="include"):
        attnfused.convert(model, include="cbam")


# ----------------------------------------------------------------------------- real models

def _timm(name, **kw):
    return functools.partial(timm.create_model, name, **kw)


# At 32x32 and batch 2 the deepest maps are 1x1: training-mode BatchNorm then normalises 2 values
# per channel, and where the two nearly meet it turned float64 rounding differences (1e-16) into
# up to 6e-6 in about 1 run of EfficientNet-B0 in 100. At 64x64 and batch 4 it normalises 16
# values: 150 runs stayed under 2e-14, and training mode takes the float64 bounds as eval mode.
REAL_MODEL_INPUT = (4, 3, 64, 64)
def _tv_efficientnet_b0_small():
    """torchvision's EfficientNet-B0 blocks (MBConv + SqueezeExcitation, SiLU, stochastic depth)
    at half width and depth: the public builder's float64 run would dominate the suite."""
    from torchvision.models import efficientnet as tve
    setting, last = tve._efficientnet_conf("efficientnet_b0", width_mult=0.5, depth_mult=0.5)
    return tve.EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=last)


def _tv_resnet_cbam():
    """torchvision's ResNet (one Bottleneck a stage) with a CBAM block after each bn3, as bench.e2e builds it."""
    from bench.e2e_models import resnet50
    return resnet50("cbam_fc", num_classes=10, layers=(1, 1, 1, 1))


SMALL_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 48, 64), stem_width=16)
REAL_MODELS = {
    "timm_seresnet18": _timm("seresnet18", **SMALL_RESNET),
    # drop_path drops in training: those calls run the block's own add and relu, with timm's draws
    "timm_seresnet18_drop_path": _timm("seresnet18", drop_path_rate=0.3, **SMALL_RESNET),
    "tv_resnet_cbam_after_bn3": lambda: _tv_resnet_cbam(),
    "timm_ecaresnet26t": _timm("ecaresnet26t", **SMALL_RESNET),
    "timm_resnet_cbam": _timm("test_resnet", block_args=dict(attn_layer="cbam")),
    "timm_resnet_lcbam": _timm("test_resnet", block_args=dict(attn_layer="lcbam")),
    "timm_resnet_ese": _timm("test_resnet", block_args=dict(attn_layer="ese")),
    "timm_resnet_ceca": _timm("test_resnet", block_args=dict(attn_layer="ceca")),
    "timm_efficientnet": _timm("test_efficientnet"),
    "timm_mobilenetv3": _timm("mobilenetv3_small_050"),
    "tv_efficientnet_b0": lambda: _tv_efficientnet_b0_small(),
    "tv_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(width_mult=0.5),
}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model(name):
    model = randomize_(REAL_MODELS[name]()).to(DT)
    converted, _ = converted_ok(model)
    sd_a, sd_b = model.state_dict(), converted.state_dict()
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert_same_training(model, converted, torch.randn(REAL_MODEL_INPUT, dtype=DT))


# ----------------------------------------------------------------------------- the residual blocks' tail

def test_fuse_tail_replaces_only_the_forward(tmp_path):
    """The blocks keep every submodule, parameter and buffer (the same objects) and change class only;
    the converted model saves with torch.save and loads in a new process (which makes the block
    classes again by name), where it computes what it computed here."""
    import subprocess
    import sys

    model = timm.create_model("seresnet18", num_classes=10, **SMALL_RESNET).eval()
    fused, entries = attnfused.convert(model, inplace=False, report=True)
    tails = [e for e in entries if e.tail]
    assert tails and all(e.converted and e.replaced_by == "TimmBasicBlockTail" for e in tails), tails
    for e in tails:
        block, original = fused.get_submodule(e.path), model.get_submodule(e.path)
        assert type(block).__mro__[1] is type(original) and block._modules.keys() == original._modules.keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = fused(x)
    assert torch.equal(copy.deepcopy(fused)(x), y)
    torch.save({"model": fused, "x": x, "y": y}, tmp_path / "m.pt")
    code = ("import torch, sys; d = torch.load(sys.argv[1], weights_only=False); m = d['model']; "
            "assert type(m.layer1[0]).__name__ == 'TimmBasicBlockTail', type(m.layer1[0]); "
            "assert torch.equal(m(d['x']), d['y'])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], check=True)


@pytest.mark.parametrize("name", ["timm_seresnet18", "tv_resnet_cbam_after_bn3"])
def test_eval_batchnorm_is_the_attentions_prologue(name):
    """With fuse_norm=True, in eval mode a converted block hands the BatchNorm before its attention to
    the fused module as its prologue: the forward runs one batch_norm fewer per block (the
    profiler), and its output and the gradients of the input and of every parameter (those
    BatchNorms' weight and bias among them) are the original's (assert_same_training, float64); in
    training mode every BatchNorm runs. The report says which BatchNorm the attention reads."""
    model = randomize_(REAL_MODELS[name]()).to(DT)
    fused, entries = attnfused.convert(model, report=True, fuse_norm=True)
    tails = [e for e in entries if e.tail]
    norm = "bn2" if name.startswith("timm") else "bn3.0"
    assert tails and all(f"{norm} in eval mode as the prologue" in str(e) for e in tails), [str(e) for e in tails]
    x = torch.randn(REAL_MODEL_INPUT, dtype=DT)

    def batch_norms(m):
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            m(x)
        return sum(e.name == "aten::batch_norm" for e in prof.events())

    for mode, fewer in (("eval", len(tails)), ("train", 0)):
        model.train(mode == "train"), fused.train(mode == "train")
        assert batch_norms(fused) == batch_norms(model) - fewer, mode
    assert_same_training(model, fused, x, modes=("eval",))
    # fuse_norm=False (the default): the tail still fused, every BatchNorm its own call
    separate, entries = attnfused.convert(model.eval(), report=True)
    assert all(e.converted and f"{norm} (BatchNorm2d) runs as it is" in str(e) for e in entries if e.tail)
    assert batch_norms(separate) == batch_norms(model)
    with pytest.raises(TypeError, match="fuse_norm must be a bool"):
        attnfused.convert(model, fuse_norm=1)


def test_tails_left_alone_say_why():
    """fuse_tail=False changes no block; a block whose attention stays, or whose activation is not a
    ReLU, keeps its class, and the report says why."""
    model = timm.create_model("test_resnet", block_args=dict(attn_layer="se"))
    out, entries = attnfused.convert(model, report=True, fuse_tail=False)
    assert not any(e.tail for e in entries) and not any(type(m).__name__.endswith("Tail") for m in out.modules())
    out, entries = attnfused.convert(model, report=True, include=lambda path, m: path.startswith("layer1"))
    tails = {e.path: e for e in entries if e.tail}
    assert tails["layer1.0"].converted and not tails["layer2.0"].converted
    assert "attention module 'se' was not converted" in tails["layer2.0"].reason
    assert type(out.layer2[0]).__name__ == "BasicBlock"
    silu = timm.create_model("test_resnet", act_layer="silu", block_args=dict(attn_layer="se"))
    _, entries = attnfused.convert(silu, report=True)
    assert all(not e.converted and "SiLU, not nn.ReLU" in e.reason for e in entries if e.tail)
    with pytest.raises(TypeError, match="fuse_tail must be a bool"):
        attnfused.convert(model, fuse_tail="yes")


def test_fused_tail_compiles_as_the_original():
    """compile_as="original": torch.compile traces the block's attention as the original code and the
    tail as plain ops after it (Inductor fuses them): the same outputs as eager."""
    model = timm.create_model("test_resnet", num_classes=10, block_args=dict(attn_layer="cbam")).eval()
    fused = attnfused.convert(model, compile_as="original")
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close(torch.compile(fused, backend="aot_eager", fullgraph=True)(x), model(x), 1e-5,
                     "compile_as='original' with the tail")
