"""Quantisation-aware training (QAT): simulate the exporters' int8 in the forward pass, train through it.

The exporters quantise a model statically (``exporters/onnx_format.py``: onnxruntime ``quantize_static`` in QDQ
form; ``exporters/tflite_quantize.py``: ai-edge-quantizer ``static_wi8_ai8``):

- weights per output channel, symmetric int8 in [-127, 127] (scale = max|w| / 127, zero point 0, so pruned zeros
  stay zero), on the BatchNorm-folded weights -- per-channel scaling commutes with the fold, so the unfolded
  weight is quantised here and the frozen (eval-mode) BatchNorm applied after it is the fold;
- activations per tensor, asymmetric int8 in [-128, 127] over [min(lo, 0), max(hi, 0)] calibrated by min/max,
  at the tensors the runtimes' QDQ graphs quantise after their fusions: the input of every Conv / Linear (e.g.
  the normalised image), the output of every Conv(+BN)(+ReLU), Linear(+ReLU) and residual Add(+ReLU) (a ReLU
  after them is fused: its output is quantised once); average pooling runs in float in both exported files, so
  its output is quantised, on a range of its own, only as the input of the next Conv / Linear.

``QATModel(model, calibration)`` traces ``model`` with ``torch.fx``, inserts ``FakeQuantAct`` observers at those
tensors and routes every Conv / Linear through ``FakeQuantWeight`` (straight-through estimators:
``torch.fake_quantize_per_channel_affine`` / ``per_tensor_affine``). The original modules and parameters are
shared, not copied: training the wrapper trains ``model``, whose state dict stays a plain float one. Activation
ranges start as the true min/max over ``calibration`` (what the exporters calibrate on) and follow an
exponential moving average of the training batches' min/max (``ema``) in train mode; eval mode uses them frozen.
BatchNorm stays in eval mode (frozen running statistics) while the wrapper trains, so that the fold the
exporters make is the normalisation the model was trained with.

Pure torch; imported by ``chita_edge.training.finetune`` only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from chita_edge.core.errors import BadInput
from chita_edge.graph.trace import ADDS, CONV, act_name, trace

QMIN, QMAX = -128, 127  # activations: int8, asymmetric
WMAX = 127  # weights: symmetric int8 [-127, 127], zero point 0

_SHAPE_FUNCS = {torch.flatten, torch.reshape}
_SHAPE_METHODS = {"flatten", "view", "reshape"}
_SHAPE_MODULES = (nn.Flatten, nn.Identity, nn.Dropout)  # no new tensor values in an exported (eval) graph


def weight_qparams(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale of symmetric int8 weights: max|w| / 127 (a tiny positive scale for all-zero
    channels, which keeps them exactly zero)."""
    absmax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    return (absmax / WMAX).clamp_min(1e-12).float()


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 round trip of ``w`` with a straight-through gradient."""
    scale = weight_qparams(w)
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -WMAX, WMAX)


def fake_quant_act(x: torch.Tensor, scale: float, zp: int, dither: bool) -> torch.Tensor:
    """Per-tensor int8 round trip; ``dither``: on a grid shifted by a random fraction of a step (one offset per
    call), so that training sees a new rounding realisation each step rather than one it could fit."""
    if not dither:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, QMIN, QMAX)
    u = (float(torch.rand(())) - 0.5) * scale
    return torch.fake_quantize_per_tensor_affine(x + u, scale, zp, QMIN, QMAX) - u


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of asymmetric int8 over [min(lo, 0), max(hi, 0)], as onnxruntime computes them."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / (QMAX - QMIN)
    zp = int(round(QMIN - lo / scale))
    return scale, max(QMIN, min(QMAX, zp))


class FakeQuantAct(nn.Module):
    """Per-tensor int8 fake quantisation of an activation with a min/max range (buffers ``lo``, ``hi``)."""

    def __init__(self, name: str, ema: float, dither: bool = False):
        super().__init__()
        self.name = name
        self.ema = ema
        self.dither = dither  # random grid offsets in train mode (see fake_quant_act)
        self.calibrating = False
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:  # true min/max over everything seen, no quantisation
            self.lo.copy_(torch.minimum(self.lo, x.detach().min()))
            self.hi.copy_(torch.maximum(self.hi, x.detach().max()))
            return x
        if self.training and self.ema > 0:
            self.lo.mul_(1 - self.ema).add_(self.ema * x.detach().min())
            self.hi.mul_(1 - self.ema).add_(self.ema * x.detach().max())
        scale, zp = act_qparams(self.lo, self.hi)
        return fake_quant_act(x, scale, zp, self.dither and self.training)

    def extra_repr(self) -> str:
        return f"{self.name}, range [{float(self.lo):.4g}, {float(self.hi):.4g}]"


class FakeQuantWeight(nn.Module):
    """A Conv / Linear run with its weight fake-quantised; the wrapped module (and its parameters) is shared."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.mod = mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_weight(self.mod.weight)
        if isinstance(self.mod, nn.Linear):
            return F.linear(x, w, self.mod.bias)
        return self.mod._conv_forward(x, w, self.mod.bias)


def _is_module(gm: fx.GraphModule, n: fx.Node, types: tuple[type, ...]) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), types)


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A ReLU / ReLU6 (module, function or method): the runtimes fuse it into the op before it."""
    return act_name(gm, n) in ("relu", "relu6")


def _is_shape(gm: fx.GraphModule, n: fx.Node) -> bool:
    return ((n.op == "call_function" and n.target in _SHAPE_FUNCS) or _is_module(gm, n, _SHAPE_MODULES)
            or (n.op == "call_method" and n.target in _SHAPE_METHODS))


class QATModel(nn.Module):
    """``model`` with int8 fake quantisation where the exporters quantise (see the module docstring)."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor, *, ema: float = 0.01, dither: bool = False,
                 batch_size: int = 256):
        super().__init__()
        gm = trace(model, needed_by="--qat")
        self.points: list[str] = []
        quantised: set[fx.Node] = set()
        fq = nn.ModuleDict()
        graph = gm.graph

        def insert_after(node: fx.Node, name: str) -> fx.Node:
            key = f"qat_act_q{len(fq)}"
            fq[key[8:]] = FakeQuantAct(name, ema, dither)
            gm.add_submodule(key, fq[key[8:]])
            with graph.inserting_after(node):
                q = graph.call_module(key, (node,))
            node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
            quantised.add(q)
            self.points.append(name)
            return q

        def chain_end(node: fx.Node, allow_bn: bool) -> fx.Node:
            """Follow the fusions the runtimes make: Conv -> BatchNorm -> ReLU, Add -> ReLU, Linear -> ReLU."""
            end = node
            users = list(end.users)
            if allow_bn and len(users) == 1 and _is_module(gm, users[0], (nn.modules.batchnorm._BatchNorm,)):
                end = users[0]
                users = list(end.users)
            if len(users) == 1 and _is_relu(gm, users[0]):
                end = users[0]
            return end

        def source(n: Any) -> Any:
            while isinstance(n, fx.Node) and _is_shape(gm, n):
                n = n.args[0]
            return n

        wrapped = 0
        for node in list(graph.nodes):
            if node in quantised:
                continue
            anchor = None
            if _is_module(gm, node, CONV + (nn.Linear,)):
                inp = node.args[0]
                if isinstance(inp, fx.Node) and source(inp) not in quantised:
                    insert_after(inp, f"{node.target}:input")
                wname = f"qat_w_{wrapped}"
                wrapped += 1
                gm.add_submodule(wname, FakeQuantWeight(gm.get_submodule(node.target)))
                anchor, allow_bn, label = node, True, str(node.target)
                node.target = wname
            elif node.op == "call_function" and node.target in ADDS and all(
                    isinstance(a, fx.Node) for a in node.args[:2]):
                anchor, allow_bn, label = node, False, f"{node.name}"
            if anchor is not None:
                end = chain_end(anchor, allow_bn)
                if end not in quantised:
                    insert_after(end, label)
        if wrapped == 0:
            raise BadInput("--qat: the model has no Conv / Linear layer to quantise")
        graph.lint()
        gm.recompile()
        self.gm = gm
        self.fq = fq
        self.model = model  # shared parameters; kept for state_dict()-free access
        self.calibrate(calibration, batch_size=batch_size)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, *, batch_size: int = 256) -> None:
        """Reset every activation range to the true min/max over ``x`` (eval-mode forward, as the exporters)."""
        was = self.training
        self.eval()
        for m in self.fq.values():
            m.lo.fill_(float("inf"))
            m.hi.fill_(float("-inf"))
            m.calibrating = True
        try:
            for i in range(0, len(x), batch_size):
                self.gm(x[i:i + batch_size])
        finally:
            for m in self.fq.values():
                m.calibrating = False
        self.train(was)

    def train(self, mode: bool = True) -> QATModel:
        super().train(mode)
        for m in self.model.modules():  # frozen BatchNorm: the statistics the exporters fold
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    @torch.no_grad()
    def snap_weights(self) -> None:
        """Round every quantised weight to its int8 grid in place (zeros stay zero): the exporters' per-channel
        quantisation of the float checkpoint is then exact, so weights add no int8-vs-float difference."""
        for m in self.gm.modules():
            if isinstance(m, FakeQuantWeight):
                m.mod.weight.copy_(fake_quant_weight(m.mod.weight))

    def ranges(self) -> dict[str, torch.Tensor]:
        """The activation ranges, ``{key: tensor([lo, hi])}`` (the resumable part of the QAT state)."""
        return {k: torch.stack([m.lo, m.hi]).clone() for k, m in self.fq.items()}

    @torch.no_grad()
    def load_ranges(self, ranges: dict[str, torch.Tensor]) -> None:
        if set(ranges) != set(self.fq):
            raise BadInput("the saved QAT activation ranges do not fit this model")
        for k, m in self.fq.items():
            m.lo.copy_(ranges[k][0])
            m.hi.copy_(ranges[k][1])


__all__ = ["FakeQuantAct", "FakeQuantWeight", "QATModel", "act_qparams", "fake_quant_weight", "weight_qparams"]
