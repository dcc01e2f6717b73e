"""The project's one ``torch.fx`` tracer and its op vocabulary.

* Tracing: ``trace`` (``torch.fx.symbolic_trace``, a ``BadInput`` naming the model when it fails),
  ``trace_shapes`` (the trace in eval mode and every node's output shape on an example input), ``Recorder``
  (runs a traced graph, recording shapes, chosen modules' inputs and chosen nodes' values), ``eval_no_grad``,
  ``as_args``.
* Op classification: the module / function / method tables the channel-space walker
  (``chita_edge.graph.channels``) sorts nodes by (``op_kind``), and the predicates the residual-block finder, the cost model
  and QAT share: ``is_conv``, ``is_depthwise``, ``is_bn_node``, ``is_add_node``, ``act_name`` (with ``ADDS``,
  ``CONV``, ``BN`` and ``ACTIVATIONS``).

Depends on ``torch`` only.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from chita_edge.core.errors import BadInput

__all__ = [
    "ACTIVATIONS",
    "ADDS",
    "ADD_METHODS",
    "BINARY_FUNCTIONS",
    "BINARY_METHODS",
    "BN",
    "CONV",
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES",
    "IDENTITY_FUNCTION_NAMES",
    "POOL_FUNCTIONS",
    "POOL_MODULES",
    "QUERY_METHODS",
    "REDUCE_FUNCTIONS",
    "REDUCE_METHODS",
    "RESHAPE_FUNCTIONS",
    "RESHAPE_METHODS",
    "RESHAPE_MODULES",
    "Recorder",
    "act_name",
    "op_kind",
    "as_args",
    "eval_no_grad",
    "first_line",
    "function_name",
    "is_add_node",
    "is_bn_node",
    "is_conv",
    "is_depthwise",
    "trace",
    "trace_shapes",
]

# --------------------------------------------------------------------------------------------------------------
# Op vocabulary

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
RESHAPE_MODULES = (nn.Flatten,)
ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, torch.clamp, torch.abs, operator.neg, operator.pos,
}
# Library functions that fx records as calls (``torch.fx.wrap``) and that leave each channel on its own in eval mode,
# where the walker traces: an identity or a per-sample scaling (torchvision's ``StochasticDepth``, used by
# EfficientNet and ConvNeXt). Named by ``module.name`` so that this layer needs no import of the library.
IDENTITY_FUNCTION_NAMES = frozenset({"torchvision.ops.stochastic_depth.stochastic_depth"})
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "clamp_min", "clamp_max", "abs",
                        "neg", "contiguous", "float", "double", "half"}
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate,
}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
QUERY_METHODS = {"size", "dim", "numel"}
NORM_MODULES = (nn.LayerNorm,)  # normalisations over the last dims (ConvNeXt's over the channels, channels last)
NORM_FUNCTIONS = {F.layer_norm}
PERMUTE_FUNCTIONS, PERMUTE_METHODS = {torch.permute, torch.transpose}, {"permute", "transpose"}
SPLIT_FUNCTIONS, SPLIT_METHODS = {torch.chunk, torch.split}, {"chunk", "split"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack}
ADDS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = ("add", "add_")

# Activations a removed residual block may leave behind, by name (``chita_edge.graph.residual``'s replacements).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "hardswish": nn.Hardswish,
}
_ACT_MODULE_NAMES = tuple((cls, name) for name, cls in ACTIVATIONS.items())
_ACT_FUNCTION_NAMES = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
                       F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish"}
_ACT_METHOD_NAMES = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def is_conv(m: nn.Module) -> bool:
    """A (non-transposed) Conv1d/2d/3d module."""
    return isinstance(m, CONV) and not getattr(m, "transposed", False)


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise conv: ``groups == in_channels == out_channels > 1``."""
    return is_conv(m) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_bn_node(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``n`` calls a BatchNorm1d/2d/3d module."""
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN)


def is_add_node(n: fx.Node) -> bool:
    """``n`` is an addition (``+``, ``+=``, ``torch.add`` or the ``add`` / ``add_`` method)."""
    return (n.op == "call_function" and n.target in ADDS) or (n.op == "call_method" and n.target in ADD_METHODS)


def op_kind(gm: fx.GraphModule, n: fx.Node, shaped: bool) -> str:
    """What ``n`` does, for the channel walker: ``"conv"``, ``"linear"``, ``"bn"``, ``"norm"`` (a LayerNorm),
    ``"elementwise"``, ``"pool"``, ``"reshape"``, ``"reduce"``, ``"binary"``, ``"cat"``, ``"permute"``,
    ``"split"``, ``"getitem"``, ``"query"`` (a shape query or an index into one: no tensor values used; ``shaped``
    says whether ``n`` gave a tensor), ``"input"`` (a placeholder or constant), ``"output"`` or ``"unknown"``."""
    op, tgt = n.op, n.target
    if op in ("placeholder", "get_attr", "output"):
        return "output" if op == "output" else "input"
    if op == "call_module":
        m = gm.get_submodule(tgt)
        for kind, test in (("conv", is_conv(m)), ("linear", isinstance(m, nn.Linear)), ("bn", isinstance(m, BN)),
                           ("norm", isinstance(m, NORM_MODULES)), ("elementwise", isinstance(m, ELEMENTWISE_MODULES)),
                           ("pool", isinstance(m, POOL_MODULES)), ("reshape", isinstance(m, RESHAPE_MODULES))):
            if test:
                return kind
        return "unknown"
    if op not in ("call_function", "call_method"):
        return "unknown"
    fn = op == "call_function"
    if (not fn and tgt in QUERY_METHODS) or (fn and tgt in (builtins.getattr, builtins.len, operator.getitem)
                                             and not shaped):
        return "query"
    table = ((fn and tgt is operator.getitem, "getitem"),
             ((fn and tgt in BINARY_FUNCTIONS) or (not fn and tgt in BINARY_METHODS), "binary"),
             ((fn and (tgt in ELEMENTWISE_FUNCTIONS or function_name(tgt) in IDENTITY_FUNCTION_NAMES))
              or (not fn and tgt in ELEMENTWISE_METHODS), "elementwise"),
             (fn and tgt in POOL_FUNCTIONS, "pool"),
             (fn and tgt in NORM_FUNCTIONS, "norm"),
             ((fn and tgt in RESHAPE_FUNCTIONS) or (not fn and tgt in RESHAPE_METHODS), "reshape"),
             ((fn and tgt in REDUCE_FUNCTIONS) or (not fn and tgt in REDUCE_METHODS), "reduce"),
             (fn and tgt in CAT_FUNCTIONS, "cat"),
             ((fn and tgt in PERMUTE_FUNCTIONS) or (not fn and tgt in PERMUTE_METHODS), "permute"),
             ((fn and tgt in SPLIT_FUNCTIONS) or (not fn and tgt in SPLIT_METHODS), "split"))
    return next((kind for test, kind in table if test), "unknown")


def act_name(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The activation ``n`` applies to its first argument (a name of ``ACTIVATIONS``), or None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return next((name for cls, name in _ACT_MODULE_NAMES if type(m) is cls), None)
    if n.op == "call_function":
        return _ACT_FUNCTION_NAMES.get(n.target)
    if n.op == "call_method":
        return _ACT_METHOD_NAMES.get(n.target)
    return None


# --------------------------------------------------------------------------------------------------------------
# Tracing


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 200 characters."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def function_name(target: Any) -> str:
    """``module.name`` of a called function (as ``IDENTITY_FUNCTION_NAMES`` spells it)."""
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


_LEAF_TYPES = (nn.modules.batchnorm._BatchNorm, nn.Linear, *CONV)


class _Tracer(fx.Tracer):
    """fx's tracer, with every BatchNorm, Linear and Conv module a leaf, a library's subclass included: timm's
    ``BatchNormAct2d`` (which also applies its activation) stays one per-channel module and timm's ``Linear``
    one Linear, instead of being traced into ``F.batch_norm`` / ``F.linear`` on attribute constants, which the
    channel walker cannot follow."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, needed_by: str = "structured pruning") -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with BatchNorm modules as leaves; ``BadInput`` saying that ``needed_by``
    needs a traceable model if it cannot be traced."""
    try:
        root = model
        graph = _Tracer().trace(root)
        return fx.GraphModule(root, graph, root.__class__.__name__)
    except Exception as e:
        raise BadInput(
            f"{type(model).__name__}: {needed_by} needs a torch.fx-traceable model, but symbolic_trace "
            f"failed ({type(e).__name__}: {first_line(e)}); remove data-dependent control flow from forward()"
        ) from None


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            m.training = t


def as_args(example_input: Any) -> tuple[Any, ...]:
    """The positional arguments of a forward call: a tuple/list as it is, anything else as a 1-tuple."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class Recorder(fx.Interpreter):
    """Runs the traced graph, recording each tensor result's shape, the inputs of chosen modules and the values
    of chosen nodes (by node name)."""

    def __init__(self, gm: fx.GraphModule, capture: frozenset[str] = frozenset(),
                 values: frozenset[str] = frozenset()):
        super().__init__(gm)
        self.capture = capture
        self.value_names = values
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
            if n.name in self.value_names:
                self.values[n.name] = result.detach().clone()
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.capture and args and isinstance(args[0], torch.Tensor):
            self.inputs.setdefault(target, []).append(args[0].detach().clone())
        return super().call_module(target, args, kwargs)


def trace_shapes(model: nn.Module, example_input: Any, needed_by: str = "structured pruning",
                 ) -> tuple[fx.GraphModule, dict[fx.Node, tuple[int, ...]]]:
    """The traced graph (``trace``) and every tensor node's output shape on ``example_input``."""
    with eval_no_grad(model):  # traced in eval mode: a `self.training` read in forward() is baked in
        gm = trace(model, needed_by)
        rec = Recorder(gm)
        try:
            rec.run(*as_args(example_input))
        except Exception as e:
            raise BadInput(f"{type(model).__name__}: the example input does not run through the model "
                           f"({type(e).__name__}: {first_line(e)})") from None
    return gm, rec.shapes

