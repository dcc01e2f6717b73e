"""torchvision and timm classifiers by name: ``torchvision:NAME`` and ``timm:NAME`` (the optional ``zoo`` extra).

A spec may carry options after ``?``, joined by ``&``::

    torchvision:mobilenet_v3_small?num_classes=10&input_size=32
    timm:mobilenetv2_050?num_classes=10&input_size=32

``num_classes`` sets the classifier's outputs (default: the family's 1000). ``input_size`` is the side S of one
square sample (3, S, S); it is recorded as the model's input shape for the steps that have no data set to take it
from (a bare export, the budget search's example input). Without it the data set's shape is used.

The model is always built with random weights (torchvision ``weights=None``, timm ``pretrained=False``), drawn
with seed 0 so that every process builds the same model; nothing is downloaded. Trained weights come as a state dict (``--weights``). The input goes to the model as the data set
gives it: unlike the ``zoo:`` models these apply no normalisation of their own.

This is the one module that imports torchvision and timm (function-local: they are optional). The torchvision
wheels on the package registry are built against CUDA torch; with a CPU torch their ``_C`` extension (the
detection ops) does not load, and ``import torchvision`` then fails where ``_meta_registrations`` registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms``, ops that only the extension defines.
``import_torchvision`` defines those two schemas itself when that happens, so the pure-Python model code imports;
the detection ops themselves stay unavailable (torchvision raises its own "Couldn't load custom C++ ops" for them).
"""

from __future__ import annotations

import difflib
import sys
from types import ModuleType

import torch
from torch import nn

from chita_edge.core.errors import BadInput, MissingExtra

FAMILIES = ("torchvision", "timm")
OPTIONS = ("num_classes", "input_size")

# the ops whose fake kernels torchvision/_meta_registrations.py registers unconditionally, with the schemas that
# torchvision/csrc/ops/{nms,quantized/cpu/qnms}.cpp define for them
DETECTION_OPS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def is_hub_spec(spec: str) -> bool:
    return spec.partition(":")[0] in FAMILIES and ".py:" not in spec


def _op_exists(qualname: str) -> bool:
    ns, _, name = qualname.partition("::")
    try:
        getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def define_detection_ops() -> list[str]:
    """Define the schemas of ``DETECTION_OPS`` that no library has defined; returns the ones it defined."""
    new = []
    for qualname, schema in DETECTION_OPS.items():
        if not _op_exists(qualname):
            torch.library.define(qualname, schema)
            new.append(qualname)
    return new


def _forget_torchvision() -> None:
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]


def import_torchvision() -> ModuleType:
    """``import torchvision``; when its C++ extension cannot load (a CUDA build beside a CPU torch), define the
    detection ops' schemas and import again. ``MissingExtra`` when torchvision is not installed."""
    try:
        import torchvision  # deferred: optional zoo extra
    except ImportError:
        raise MissingExtra("zoo", "torchvision:NAME (and timm:NAME)") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e) or not define_detection_ops():
            raise
        _forget_torchvision()  # the failed import left half-initialised modules behind
        import torchvision  # deferred: optional zoo extra
    return torchvision


def import_timm() -> ModuleType:
    """``import timm`` (which imports torchvision, so that goes first); ``MissingExtra`` when absent."""
    import_torchvision()
    try:
        import timm  # deferred: optional zoo extra
    except ImportError:
        raise MissingExtra("zoo", "timm:NAME") from None
    return timm


def parse_spec(spec: str) -> tuple[str, str, dict[str, int]]:
    """``family:NAME?key=value&...`` -> (family, NAME, options); one BadInput line on anything else."""
    family, _, rest = spec.partition(":")
    name, _, query = rest.partition("?")
    if family not in FAMILIES or not name:
        raise BadInput(f"model '{spec}': expected torchvision:NAME or timm:NAME, optionally with "
                       f"?num_classes=N&input_size=S")
    opts: dict[str, int] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in OPTIONS or not eq:
            raise BadInput(f"model '{spec}': unknown option '{part}'; expected {' or '.join(k + '=N' for k in OPTIONS)}")
        try:
            opts[key] = int(value)
        except ValueError:
            opts[key] = 0
        if opts[key] <= 0:
            raise BadInput(f"model '{spec}': {key} must be a positive integer, got '{value}'")
    return family, name, opts


def _unknown(spec: str, family: str, name: str, names: list[str]) -> BadInput:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(family + ':' + c for c in close)}?" if close else ""
    return BadInput(f"model '{spec}': {family} has no classification model '{name}'{hint}")


def build_hub_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The model a ``torchvision:``/``timm:`` spec names, randomly initialised, and its sample shape (or None)."""
    family, name, opts = parse_spec(spec)
    kwargs = {"num_classes": opts["num_classes"]} if "num_classes" in opts else {}
    if family == "torchvision":
        tv = import_torchvision()
        names = tv.models.list_models(module=tv.models)  # classification models only
        if name not in names:
            raise _unknown(spec, family, name, names)
        build = lambda: tv.models.get_model(name, weights=None, **kwargs)  # noqa: E731
    else:
        timm = import_timm()
        if not timm.is_model(name):
            raise _unknown(spec, family, name, timm.list_models())
        build = lambda: timm.create_model(name, pretrained=False, **kwargs)  # noqa: E731
    try:
        with torch.random.fork_rng(devices=[]):  # the same random init in every process; the caller's RNG untouched
            torch.manual_seed(0)
            model = build()
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise BadInput(f"model '{spec}': {family} could not build it ({type(e).__name__}: {first})") from None
    size = opts.get("input_size")
    return model, ((3, size, size) if size else None)
