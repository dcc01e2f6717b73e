"""chita_edge.graph (channels, residual, plan, compact, macs): channel groups, plans, compaction, MAC counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.errors import BadInput
from chita_edge.graph.channels import channel_groups, channel_weight_indices
from chita_edge.graph.compact import compact_model
from chita_edge.graph.macs import count_macs
from chita_edge.graph.plan import apply_plan, plan_from_zeros
from chita_edge.models.loading import load_model
from chita_edge.models.zoo import MLPNet, MobileNetV1, ResNet20

torch.set_num_threads(1)


def members(g):
    return [(m.module, m.kind, m.repeat) for m in g.members]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics, so that BN constants are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def zero_channel(model: nn.Module, group, c: int) -> None:
    """Zero the producers' output slice of channel c (the weights a structured solver would remove)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, idx in channel_weight_indices(group, c, kinds=("out",)).items():
            params[name].view(-1)[idx] = 0.0
        for m in group.producers:
            b = model.get_submodule(m.module).bias
            if b is not None:
                b[c] = 0.0


def set_bn_constant(model: nn.Module, bn: str, c: int, beta: float) -> None:
    """Make BN map a zero input of channel c to exactly ``beta``."""
    m = model.get_submodule(bn)
    with torch.no_grad():
        m.running_mean[c] = 0.0
        m.bias[c] = beta


def assert_same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        diff = (a(x) - b(x)).abs().max().item()
    assert diff <= 1e-5, diff


# ---------------------------------------------------------------------------------------------------------------
# Tiny models with hand-derived groups


class TinyRes(nn.Module):
    """stem -> block (identity shortcut) -> block (stride 2, 1x1 downsample) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.a1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(4)
        self.a2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.a2_bn = nn.BatchNorm2d(4)
        self.b1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.b1_bn = nn.BatchNorm2d(6)
        self.b2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b2_bn = nn.BatchNorm2d(6)
        self.down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.a2_bn(self.a2(torch.relu(self.a1_bn(self.a1(x))))) + x)
        y = self.b2_bn(self.b2(torch.relu(self.b1_bn(self.b1(x)))))
        x = torch.relu(y + self.down(x))
        return self.fc(x.mean((2, 3)))


class TinyDW(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(4, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = nn.functional.relu(self.bn0(self.c0(x)))
        x = nn.functional.relu6(self.bn1(self.dw(x)))
        x = nn.functional.relu(self.bn2(self.pw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def seq_cnn() -> nn.Sequential:
    """A plain user CNN on 8x8 inputs: the flatten makes each channel of '3' 16 features of '8'."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


def test_tiny_residual_net_groups():
    groups = channel_groups(TinyRes(), torch.rand(1, 3, 8, 8))
    got = {g.id: (g.size, sorted(members(g))) for g in groups}
    assert got == {
        "stem": (4, sorted([("stem", "out", 1), ("stem_bn", "bn", 1), ("a1", "in", 1), ("a2", "out", 1),
                            ("a2_bn", "bn", 1), ("b1", "in", 1), ("down.0", "in", 1)])),
        "a1": (4, sorted([("a1", "out", 1), ("a1_bn", "bn", 1), ("a2", "in", 1)])),
        "b1": (6, sorted([("b1", "out", 1), ("b1_bn", "bn", 1), ("b2", "in", 1)])),
        "b2": (6, sorted([("b2", "out", 1), ("b2_bn", "bn", 1), ("down.0", "out", 1), ("down.1", "bn", 1),
                          ("fc", "in", 1)])),
    }
    assert [g.id for g in groups] == ["stem", "a1", "b1", "b2"]  # execution order of the first producer


def test_resnet20_groups():
    groups = channel_groups(ResNet20(), torch.rand(1, 3, 32, 32))
    by_id = {g.id: g for g in groups}
    free = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert sorted(by_id) == sorted(["conv1", "layer2.0.conv2", "layer3.0.conv2", *free])
    stage1 = {(m.module, m.kind) for m in by_id["conv1"].members}
    assert stage1 == {("conv1", "out"), ("bn1", "bn"), ("layer2.0.conv1", "in"), ("layer2.0.downsample.0", "in")} | {
        (f"layer1.{b}.{n}", k) for b in range(3) for n, k in (("conv1", "in"), ("conv2", "out"), ("bn2", "bn"))}
    stage3 = by_id["layer3.0.conv2"]
    assert stage3.size == 64 and ("fc", "in", 1) in members(stage3)
    assert {m.module for m in stage3.producers} == {"layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2",
                                                     "layer3.2.conv2"}
    for f in free:
        assert [m.kind for m in by_id[f].members] == ["out", "bn", "in"]
    assert all(not (m.module == "fc" and m.kind == "out") for g in groups for m in g.members)


def test_depthwise_groups():
    groups = channel_groups(TinyDW(), torch.rand(1, 3, 8, 8))
    assert [(g.id, g.size, members(g)) for g in groups] == [
        ("c0", 4, [("c0", "out", 1), ("bn0", "bn", 1), ("dw", "dw", 1), ("bn1", "bn", 1), ("pw", "in", 1)]),
        ("pw", 8, [("pw", "out", 1), ("bn2", "bn", 1), ("fc", "in", 1)]),
    ]
    mb = MobileNetV1(num_classes=10, alpha=0.25)
    groups = channel_groups(mb, torch.rand(1, 3, 32, 32))
    assert len(groups) == 14  # the stem and the 13 pointwise convs
    dws = [m.module for g in groups for m in g.members if m.kind == "dw"]
    n_dw = sum(1 for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    assert len(dws) == len(set(dws)) == n_dw == 13


def test_mlp_and_flatten_groups():
    groups = channel_groups(MLPNet(), torch.rand(2, 1, 28, 28))
    assert [(g.id, g.size, members(g)) for g in groups] == [
        ("fc1", 40, [("fc1", "out", 1), ("fc2", "in", 1)]),
        ("fc2", 20, [("fc2", "out", 1), ("fc3", "in", 1)]),
    ]
    groups = channel_groups(seq_cnn(), torch.rand(2, 3, 8, 8))
    assert [(g.id, g.size, members(g)) for g in groups] == [
        ("0", 6, [("0", "out", 1), ("1", "bn", 1), ("3", "in", 1)]),
        ("3", 8, [("3", "out", 1), ("4", "bn", 1), ("8", "in", 16)]),  # 4x4 features per channel after flatten
    ]


class Blocked(nn.Module):
    """a/b go through cat (each reaches c at its offset), d's output is scaled per channel by a constant and feeds
    the output: a, b and c are free."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1))

    def forward(self, x):
        z = torch.relu(self.c(torch.cat([self.a(x), self.b(x)], 1)))
        return self.d(z) * self.scale


class Gated(nn.Module):
    """a's channels are multiplied by an input-dependent one-channel mask: a zeroed channel would not stay fixed."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 1, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) * torch.sigmoid(self.m(x))))


def test_blocked_channels_are_not_groups():
    groups = channel_groups(Blocked(), torch.rand(1, 3, 4, 4))
    assert [(g.id, members(g)) for g in groups] == [("a", [("a", "out", 1), ("c", "in", 1)]),
                                                    ("b", [("b", "out", 1), ("c", "in", 1)]),
                                                    ("c", [("c", "out", 1), ("d", "in", 1)])]
    assert [m.offset for g in groups[:2] for m in g.consumers] == [0, 4]
    assert channel_groups(Gated(), torch.rand(1, 3, 4, 4)) == []


def test_channel_weight_indices_are_the_slices():
    model = seq_cnn()
    g = channel_groups(model, torch.rand(1, 3, 8, 8))[1]  # "3": conv 6->8 1x1, then Linear(128, 5) in, repeat 16
    idx = channel_weight_indices(g, 2)
    assert sorted(idx) == ["3.weight", "8.weight"]
    w3 = torch.zeros(8, 6, 1, 1)
    w3.view(-1)[idx["3.weight"]] = 1
    expected3 = torch.zeros(8, 6, 1, 1)
    expected3[2] = 1
    assert torch.equal(w3, expected3)
    w8 = torch.zeros(5, 128)
    w8.view(-1)[idx["8.weight"]] = 1
    expected8 = torch.zeros(5, 128)
    expected8[:, 32:48] = 1
    assert torch.equal(w8, expected8)
    assert len(channel_weight_indices(g, 2, kinds=("bn",))["4.weight"]) == 1
    with pytest.raises(BadInput, match="channels 0..7"):
        channel_weight_indices(g, 8)


# ---------------------------------------------------------------------------------------------------------------
# Compaction


def test_compact_mlpnet_removes_zero_neurons():
    torch.manual_seed(0)
    model = MLPNet().eval()
    g1, g2 = channel_groups(model, torch.rand(2, 1, 28, 28))
    for c in (3, 7, 11):
        zero_channel(model, g1, c)
    for c in (0, 5):
        zero_channel(model, g2, c)
    before = n_params(model)
    small, plan = compact_model(model, torch.rand(2, 1, 28, 28))
    assert plan["keep"]["fc1"] == [c for c in range(40) if c not in (3, 7, 11)]
    assert plan["keep"]["fc2"] == [c for c in range(20) if c not in (0, 5)]
    assert plan["add_bias"] == []  # relu(0) = 0: nothing to fold
    assert n_params(model) == before  # the original is untouched
    assert n_params(small) == 784 * 37 + 37 * 18 + 18 * 10
    assert small.fc2.weight.shape == (18, 37) and small.fc2.in_features == 37
    assert_same_output(model, small, torch.rand(16, 1, 28, 28))  # fresh inputs, not the example


def test_compact_folds_batchnorm_constants_into_consumers():
    torch.manual_seed(1)
    model = seq_cnn()
    randomize_bn(model)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    g0, g3 = channel_groups(model, x)
    zero_channel(model, g0, 1)
    set_bn_constant(model, "1", 1, -0.5)  # relu(-0.5) = 0: dropped as is
    zero_channel(model, g0, 2)
    set_bn_constant(model, "1", 2, 0.7)  # relu(0.7) = 0.7 everywhere: folded into conv '3' (1x1, gains a bias)
    zero_channel(model, g3, 5)
    set_bn_constant(model, "4", 5, 0.3)  # 0.3 through maxpool+flatten: folded into Linear '8'
    small, plan = compact_model(model, x)
    assert plan["keep"] == {"0": [0, 3, 4, 5], "3": [0, 1, 2, 3, 4, 6, 7]}
    assert plan["add_bias"] == ["3"]
    assert n_params(small) == 4 * 28 + 4 * 2 + (7 * 4 + 7) + 7 * 2 + (5 * 7 * 16 + 5)
    assert_same_output(model, small, torch.rand(8, 3, 8, 8))
    # the plan alone makes a fresh model accept the compact state dict
    fresh = seq_cnn()
    apply_plan(fresh, json.loads(json.dumps(plan)), where="test")
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert_same_output(small, fresh, torch.rand(4, 3, 8, 8))


def test_zero_channel_with_nonzero_constant_before_padded_conv_is_kept():
    torch.manual_seed(2)
    model = ResNet20()
    randomize_bn(model)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    g = {gr.id: gr for gr in channel_groups(model, x)}["layer1.0.conv1"]
    zero_channel(model, g, 3)
    set_bn_constant(model, "layer1.0.bn1", 3, -1.0)
    zero_channel(model, g, 7)
    set_bn_constant(model, "layer1.0.bn1", 7, 0.5)  # a constant 0.5 into a zero-padded 3x3 conv: borders differ
    plan = plan_from_zeros(model, x)
    assert plan["keep"] == {"layer1.0.conv1": [c for c in range(16) if c != 3]}


def resnet20_with_zeros(seed: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """ResNet20 with zeroed channels: two free ones (layer1.0.conv1) and one residual one (stage 3)."""
    torch.manual_seed(seed)
    model = ResNet20()
    randomize_bn(model, seed)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    groups = {g.id: g for g in channel_groups(model, x)}
    for c in (3, 9):
        zero_channel(model, groups["layer1.0.conv1"], c)
        set_bn_constant(model, "layer1.0.bn1", c, -1.0)
    stage3 = groups["layer3.0.conv2"]
    zero_channel(model, stage3, 10)
    for bn in ("layer3.0.bn2", "layer3.0.downsample.1", "layer3.1.bn2", "layer3.2.bn2"):
        set_bn_constant(model, bn, 10, -1.0)  # every branch into each add is negative: relu gives 0
    return model, x


def test_compact_resnet20_and_reload_with_plan(tmp_path):
    model, x = resnet20_with_zeros()
    small, plan = compact_model(model, x)
    assert plan["keep"] == {"layer1.0.conv1": [c for c in range(16) if c not in (3, 9)],
                            "layer3.0.conv2": [c for c in range(64) if c != 10]}
    free = 2 * (16 * 9 + 2 + 16 * 9)  # conv1 rows, bn1, conv2 columns
    residual = 3 * 64 * 9 + 32 + 4 * 2 + 2 * 64 * 9 + 10  # 3 conv2 rows, downsample row, 4 BNs, 2 conv1 cols, fc
    assert n_params(model) - n_params(small) == free + residual
    assert small.layer3[1].conv1.weight.shape == (64, 63, 3, 3)
    assert_same_output(model, small, torch.rand(4, 3, 32, 32))

    fresh = ResNet20()
    apply_plan(fresh, json.loads(json.dumps(plan)), where="test")
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert_same_output(small, fresh, torch.rand(4, 3, 32, 32))

    # the checkpoint path models.py takes: meta["plan"] is applied before the strict load
    ckpt = tmp_path / "small.pt"
    save_checkpoint(ckpt, small.state_dict(), {"model": "zoo:resnet20", "plan": plan})
    lm = load_model(None, ckpt)
    assert_same_output(small, lm.module, torch.rand(2, 3, 32, 32))


def test_compact_mobilenet_depthwise():
    torch.manual_seed(4)
    model = MobileNetV1(num_classes=10, alpha=0.25)
    randomize_bn(model, 4)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    g = {gr.id: gr for gr in channel_groups(model, x)}["features.2.0"]  # pw -> bn -> relu -> dw -> bn -> relu -> pw
    zero_channel(model, g, 4)
    set_bn_constant(model, "features.2.1", 4, -1.0)  # relu -> 0, dw(0) = 0 ...
    set_bn_constant(model, "features.3.1", 4, 0.4)  # ... then a constant 0.4 into a 1x1 conv: folded
    zero_channel(model, g, 9)
    set_bn_constant(model, "features.2.1", 9, 0.5)  # dw of a constant 0.5 with zero padding: not constant, kept
    before = n_params(model)
    small, plan = compact_model(model, x)
    assert plan["keep"] == {"features.2.0": [c for c in range(16) if c != 4]}
    assert plan["add_bias"] == ["features.4.0"]
    assert small.features[3][0].weight.shape == (15, 1, 3, 3) and small.features[3][0].groups == 15
    # pw row (8 in), 2 BNs, dw filter, next pw column (32 out); the new bias adds 32
    assert before - n_params(small) == 8 + 2 + 9 + 2 + 32 - 32
    assert_same_output(model, small, torch.rand(4, 3, 32, 32))
    fresh = MobileNetV1(num_classes=10, alpha=0.25)
    apply_plan(fresh, plan, where="test")
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert_same_output(small, fresh, torch.rand(2, 3, 32, 32))


def test_nothing_to_remove_gives_an_empty_plan_and_an_equal_copy():
    model = TinyRes().eval()
    x = torch.rand(2, 3, 8, 8)
    small, plan = compact_model(model, x)
    assert plan == {"version": 1, "keep": {}, "groups": {}, "add_bias": []}
    assert small is not model and n_params(small) == n_params(model)
    assert_same_output(model, small, x)


def test_a_group_keeps_one_channel():
    model = MLPNet().eval()
    g1 = channel_groups(model, torch.rand(1, 1, 28, 28))[0]
    for c in range(40):
        zero_channel(model, g1, c)
    small, plan = compact_model(model, torch.rand(1, 1, 28, 28))
    assert plan["keep"]["fc1"] == [0]
    assert small.fc1.weight.shape == (1, 784)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _mlp_plan() -> dict:
    model = MLPNet()
    g1 = channel_groups(model, torch.rand(1, 1, 28, 28))[0]
    zero_channel(model, g1, 2)
    return plan_from_zeros(model, torch.rand(1, 1, 28, 28))


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(version=3), "version 3 is not supported"),
    (lambda p: p.update(drop={"fc1": "identity"}), "'drop' needs version 2"),
    (lambda p: p.update(version=2, drop={"fc9": "identity"}), "drop names module 'fc9'"),
    (lambda p: p.update(version=2, drop={"fc1": "softmax"}), "expected one of"),
    (lambda p: p.update(version=2, drop=["fc1"]), "'drop' must be an object"),
    (lambda p: p.pop("keep"), "'keep' and 'groups' must be objects"),
    (lambda p: p["groups"]["fc1"]["members"][1].update(module="fc9"), "does not have"),
    (lambda p: p["keep"]["fc1"].append(40), "index 40 is out of range 0..39"),
    (lambda p: p["keep"].update(fc1=[3, 1]), "strictly increasing"),
    (lambda p: p["keep"].update(fc1=[]), "non-empty list"),
    (lambda p: p["groups"]["fc1"]["members"][0].update(kind="dw"), "cannot be a 'dw' member"),
    (lambda p: (p["groups"]["fc1"].update(size=30), p["keep"].update(fc1=[0, 1])), "has 40 out channels, the plan expects 30"),
    (lambda p: p.update(add_bias=["norm"]), "not a Conv/Linear"),
])
def test_bad_plans_are_bad_input_and_change_nothing(edit, message):
    plan = _mlp_plan()
    edit(plan)
    model = MLPNet()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(BadInput, match=message) as e:
        apply_plan(model, plan, where="ckpt.pt")
    assert str(e.value).startswith("ckpt.pt: plan ") and "\n" not in str(e.value)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_plan_for_another_model_or_applied_twice():
    plan = _mlp_plan()
    with pytest.raises(BadInput, match="not a JSON object|must be a JSON object"):
        apply_plan(MLPNet(), [plan], where="x")
    with pytest.raises(BadInput, match="names module 'fc1'"):
        apply_plan(ResNet20(), plan, where="x")
    model = MLPNet()
    apply_plan(model, plan, where="x")
    with pytest.raises(BadInput, match="applied already"):
        apply_plan(model, plan, where="x")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.c(x)
        return x


def test_untraceable_model_is_bad_input():
    with pytest.raises(BadInput, match="Branchy: structured pruning needs a torch.fx-traceable model"):
        channel_groups(Branchy(), torch.rand(1, 3, 8, 8))
    with pytest.raises(BadInput, match="example input does not run"):
        channel_groups(MLPNet(), torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# MACs


def test_count_macs_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    macs = count_macs(model, torch.rand(3, 3, 8, 8))  # per sample: the batch of 3 is divided out
    assert macs == {"0": 8 * 8 * 4 * 3 * 9, "2": 8 * 8 * 4 * 9, "3": 4 * 4 * 6 * 4, "6": 5 * 6}
    mlp = count_macs(MLPNet(), torch.rand(2, 1, 28, 28))
    assert mlp == {"fc1": 784 * 40, "fc2": 40 * 20, "fc3": 20 * 10}


def test_count_macs_drop_after_compaction():
    model, x = resnet20_with_zeros()
    small, _ = compact_model(model, x)
    a, b = count_macs(model, x), count_macs(small, x)
    # layer1.0.conv1 lost 2 of 16 output channels: 32x32 positions x 16 inputs x 9 each
    assert a["layer1.0.conv1"] - b["layer1.0.conv1"] == 2 * 32 * 32 * 16 * 9
    assert a["fc"] - b["fc"] == 10 and b["fc"] == 63 * 10


# ----------------------------------------------------------------------------------------- residual blocks


class ResBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x))))))"""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class PreAct(nn.Module):
    """x + conv(x), no activation after the add."""

    def __init__(self, c: int):
        super().__init__()
        self.c = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.c(x)


class NoConv(nn.Module):
    def forward(self, x):
        return x + torch.sigmoid(x)  # f without a Conv/Linear: never zero, not a block


class Leaky(nn.Module):
    """x + f(x) where f also uses x directly (a path from x to the add that avoids the conv)."""

    def __init__(self, c: int):
        super().__init__()
        self.c = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.c(x) * torch.sigmoid(x)


class TinyDeep(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.r1, self.r2 = ResBlock(8), ResBlock(8)
        self.pre = PreAct(8)
        self.tanh_in = nn.Conv2d(8, 8, 1)
        self.r3 = ResBlock(8)  # its input is a tanh output: relu(x) != x, the ReLU stays
        self.noconv, self.leaky = NoConv(), Leaky(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.pre(self.r2(self.r1(x)))
        x = self.r3(torch.tanh(self.tanh_in(x)))
        x = self.leaky(self.noconv(x))
        return self.fc(x.mean((2, 3)))


def _zero_block(model, block):
    from chita_edge.pruning.channels import zero_block

    zero_block(model, block)


def test_residual_blocks_are_found_from_the_graph():
    from chita_edge.graph.residual import residual_blocks

    m = TinyDeep().eval()
    blocks = {b.id: b for b in residual_blocks(m, torch.rand(1, 3, 8, 8))}
    assert list(blocks) == ["r1", "r2", "pre", "r3"]  # noconv (no conv) and leaky (x bypasses the conv): not
    assert blocks["r1"].replacement == "identity" and blocks["r2"].replacement == "identity"  # relu of a relu
    assert blocks["pre"].replacement == "identity"
    assert blocks["r3"].replacement == "relu"  # its input is a tanh output
    assert blocks["r1"].modules == ("r1.c1", "r1.b1", "r1.c2", "r1.b2")
    rn = [b.id for b in residual_blocks(ResNet20(), torch.rand(1, 3, 32, 32))]
    assert rn == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]  # not the
    # three blocks with a 1x1-conv shortcut
    assert residual_blocks(MobileNetV1(), torch.rand(1, 3, 32, 32)) == []
    assert residual_blocks(MLPNet(), torch.rand(1, 1, 28, 28)) == []


def test_dropped_blocks_compact_export_and_replay(tmp_path):
    import onnx
    import onnxruntime as ort
    from chita_edge.exporters import ExportConfig, export_model

    from chita_edge.graph.residual import residual_blocks

    torch.manual_seed(0)
    m = TinyDeep().eval()
    randomize_bn(m)
    x = torch.rand(8, 3, 8, 8)
    blocks = {b.id: b for b in residual_blocks(m, x[:1])}
    dense_small, _ = compact_model(m, x[:1])
    assert "drop" not in _  # nothing zero: nothing dropped
    for b in ("r2", "r3"):
        _zero_block(m, blocks[b])
    small, plan = compact_model(m, x[:1])
    assert plan["version"] == 2 and plan["drop"] == {"r2": "identity", "r3": "relu"}
    assert isinstance(small.r2, nn.Identity) and isinstance(small.r3, nn.ReLU)
    assert n_params(small) < n_params(m) - 2 * 8 * 8 * 9
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(small(x), ref, atol=1e-5)
    # the plan replays on a fresh model (JSON round trip) and the compact state dict loads strictly
    fresh = TinyDeep()
    apply_plan(fresh, json.loads(json.dumps(plan)), where="test")
    fresh.load_state_dict(small.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, atol=1e-5)
    with pytest.raises(BadInput, match="already removed"):
        apply_plan(fresh, plan, where="test")
    # the compact ONNX export physically drops the block's convs, BatchNorms and Add, with parity
    counts = {}
    for name, model in (("dense", dense_small), ("dropped", m)):
        out = tmp_path / f"{name}.onnx"
        export_model(model, ExportConfig(format="onnx", layout="compact"), example_input=x[:1], out=out,
                     parity_inputs=x)
        ops = [n.op_type for n in onnx.load(str(out)).graph.node]
        counts[name] = (ops.count("Conv"), ops.count("Add"))
        if name == "dropped":
            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            np_ref = ref.numpy()
            assert abs(got - np_ref).max() < 1e-4
    assert counts["dropped"][0] == counts["dense"][0] - 4  # 2 convs per removed block
    assert counts["dropped"][1] == counts["dense"][1] - 2  # and their residual adds
