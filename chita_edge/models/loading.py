"""Resolve a MODEL spec into an ``nn.Module``: ``zoo:NAME``, ``path/to/file.py:factory``, ``program.pt2``, or
``torchvision:NAME`` / ``timm:NAME`` (``chita_edge.models.hub``, the ``zoo`` extra)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import traceback
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.core.checkpoint import read_weights
from chita_edge.core.errors import BadInput
from chita_edge.core.io import require_file
from chita_edge.graph.plan import apply_plan
from chita_edge.models.hub import build_hub_model, is_hub_spec
from chita_edge.models.zoo import ZOO, default_prunable


@dataclass
class LoadedModel:
    module: nn.Module
    spec: str
    prunable: Callable[[nn.Module, str], bool] = default_prunable
    input_shape: tuple[int, ...] | None = None  # one sample (CHW), when known
    meta: dict[str, Any] | None = None  # chita-edge checkpoint metadata, when the weights carried it
    weights_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _from_file(spec: str) -> nn.Module:
    path_s, _, factory = spec.rpartition(":")
    path = require_file(path_s, "model file")
    # a name from the path's sha256, not hash(): the same in every process (it is written into exported graphs)
    mod_name = f"chita_edge_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    try:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert module_spec is not None and module_spec.loader is not None
        mod = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(mod)
    except SystemExit as e:
        raise BadInput(f"{path}: importing the model file called sys.exit({e.code!r}); a model file must only "
                       "define its factory") from None
    except Exception as e:
        raise BadInput(f"{path}: could not import the model file ({type(e).__name__}: {e})") from None
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise BadInput(f"{path}: has no function '{factory}' (MODEL is path/to/file.py:factory)")
    try:
        model = fn()
    except SystemExit as e:
        raise BadInput(f"{path}:{factory}() called sys.exit({e.code!r}); the factory must return the model, "
                       "not exit") from None
    except Exception as e:
        raise BadInput(f"{path}:{factory}() failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"{path}:{factory}() returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No log records or warnings while it runs: torch.export.load logs a whole traceback before it raises."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _from_pt2(spec: str) -> nn.Module:
    path = require_file(spec, "exported program")
    try:
        with _quiet():
            return torch.export.load(str(path)).module()
    except Exception as e:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("/data.pkl") for n in z.namelist()):
                    raise BadInput(f"{path}: a torch.save checkpoint, not a torch.export program; give it with "
                                   "--weights and the model as MODEL") from None
        while e.__cause__ or e.__context__:  # torch's own message points at the log lines silenced above
            e = e.__cause__ or e.__context__  # type: ignore[assignment]
        raise BadInput(f"{path}: not a loadable torch.export program (expected a file written by "
                       f"torch.export.save; {_first_line(e)})") from None


def model_file(spec: str | None) -> str | None:
    """The file a MODEL spec reads (``file.py:factory`` -> file.py, ``program.pt2``; ``zoo:NAME`` -> None)."""
    if not spec or spec.startswith("zoo:"):
        return None
    if spec.endswith(".pt2"):
        return spec
    return spec.rpartition(":")[0] if ".py:" in spec else None


def build_model(spec: str) -> LoadedModel:
    """Build the (untrained) model a spec names."""
    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in ZOO:
            raise BadInput(f"model '{spec}': unknown zoo model; available: {', '.join('zoo:' + k for k in ZOO)}")
        e = ZOO[name]
        return LoadedModel(e.factory(), spec, e.prunable, e.input_shape)
    if is_hub_spec(spec):
        module, shape = build_hub_model(spec)
        return LoadedModel(module, spec, input_shape=shape)
    if spec.endswith(".pt2"):
        return LoadedModel(_from_pt2(spec), spec)
    if ".py:" in spec:
        path_s = spec.rpartition(":")[0]
        return LoadedModel(_from_file(spec), f"{os.path.abspath(path_s)}:{spec.rpartition(':')[2]}")
    raise BadInput(f"model '{spec}': expected zoo:NAME, path/to/file.py:factory, a .pt2 program, "
                   f"torchvision:NAME or timm:NAME")


def apply_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line BadInput on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {', '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
        raise BadInput(f"{where}: weights do not fit the model ({'; '.join(parts)})")
    if getattr(sd, "_metadata", None) is None:  # a plain dict (a checkpoint file): the model's own module versions,
        sd = OrderedDict(sd)  # which some modules require (torchvision's MNASNet refuses a state dict without)
        sd._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(sd, strict=True)


def load_model(spec: str | None, weights: str | os.PathLike | None = None) -> LoadedModel:
    """Build the model and load weights. ``spec`` may be None when ``weights`` is a chita-edge checkpoint."""
    sd, meta = (None, None)
    if weights is not None:
        sd, meta = read_weights(weights)
    if spec is None:
        if weights is None:
            raise BadInput("no model: give MODEL (zoo:NAME, path/to/file.py:factory, a .pt2 program) or a "
                           "chita-edge checkpoint with --weights")
        if meta is None or "model" not in meta:
            raise BadInput(f"{weights}: not a chita-edge checkpoint; give the MODEL spec as well")
        spec = meta["model"]
    lm = build_model(spec)
    if meta and meta.get("plan"):

        apply_plan(lm.module, meta["plan"], where=str(weights))
    if sd is not None:
        apply_state_dict(lm.module, sd, str(weights))
    lm.module.eval()
    lm.meta, lm.weights_path = meta, (str(Path(weights)) if weights is not None else None)
    return lm


def _raised_in_torch(e: BaseException) -> bool:
    """Whether the innermost Python frame of ``e``'s traceback is torch's own code (not the user's forward)."""
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(torch_dir)


def check_fits(lm: LoadedModel, x: torch.Tensor, where: str, labels: tuple[torch.Tensor, ...] = ()) -> None:
    """Run one example through the model; a shape mismatch, or a label the model has no output for, becomes
    one BadInput line."""
    try:
        with torch.no_grad():
            out = lm.module(x[:1])
    except SystemExit as e:
        raise BadInput(f"{lm.spec}: the model's forward called sys.exit({e.code!r}) on data {where}; it must return "
                       "the logits") from None
    except Exception as e:
        if _raised_in_torch(e):  # a layer refused the input: a shape or dtype mismatch
            raise BadInput(f"{where}: data of shape {tuple(x.shape[1:])} does not fit the model "
                           f"({_first_line(e)})") from None
        raise BadInput(f"{lm.spec}: the model's forward raised on data of shape {tuple(x.shape[1:])} from {where} "
                       f"({_first_line(e)})") from None
    if not isinstance(out, torch.Tensor):
        raise BadInput(f"{lm.spec}: the model's forward returns a {type(out).__name__}; expected one "
                       "(batch, classes) tensor of logits (return only the logits)")
    if out.dim() != 2:
        raise BadInput(f"{where}: the model returns shape {tuple(out.shape)}; expected (batch, classes) logits")
    top = max((int(y.max()) for y in labels if len(y)), default=-1)
    if top >= out.shape[1]:
        raise BadInput(f"{where}: label {top} is out of range for a model with {out.shape[1]} outputs; "
                       f"expected labels 0..{out.shape[1] - 1}")
