"""Checkpoints: plain state dicts in, chita-edge checkpoints out, always read with ``weights_only=True``.

A chita-edge checkpoint is a dict ``{"chita_edge": meta, "state_dict": sd}`` where ``meta`` holds only
strings, numbers, lists and dicts (the model spec, the method, the structural plan, ...), so that it loads
with ``torch.load(path, weights_only=True)`` and ``model.load_state_dict(ckpt["state_dict"])``.

``meta["tensors_sha256"]`` is the sha256 of the tensors (names, dtypes, shapes, bytes; ``tensors_sha256``),
written at save and checked on every load: a file whose tensor bytes changed is refused as corrupted (torch's
zip container does not check its CRCs). A plain state dict carries no hash and cannot be checked. Weights
holding NaN or Inf are refused on load, naming the tensor.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from typing import Any

import torch

from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_path, require_file

FORMAT = "chita-edge/checkpoint-v1"


def _describe_head(head: bytes) -> str:
    """What a file that is not a torch.save archive looks like, from its first bytes."""
    if not head:
        return "an empty file"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "an HTML page, e.g. a download's error page"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head[:64]):
        return f"text beginning {(head.strip()[:40].decode('ascii').splitlines() or [''])[0]!r}"
    return "bytes that are neither a zip archive nor a pickle"


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load a state dict (plain, or a chita-edge checkpoint) safely. Returns (state_dict, meta or None)."""
    p = require_file(path, "weights file")
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise BadInput(f"{p}: cannot read the weights file ({e.strerror})") from None
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x80")):  # torch.save: a zip (or a legacy pickle)
        raise BadInput(f"{p}: not a PyTorch checkpoint ({_describe_head(head)}); expected a file written by "
                       "torch.save (a state dict or a chita-edge checkpoint)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in str(e).lower():
            raise BadInput(f"{p}: refused: the file contains pickled objects other than tensors "
                           f"(only plain state dicts are loaded, with weights_only=True)") from None
        raise BadInput(f"{p}: not a readable PyTorch weights file ({msg[:200]})") from None
    if isinstance(obj, dict) and "chita_edge" in obj and "state_dict" in obj:
        meta = obj["chita_edge"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BadInput(f"{p}: chita-edge checkpoint of unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        sd = obj["state_dict"]
    else:
        meta, sd = None, obj
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise BadInput(f"{p}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    recorded = meta.get("tensors_sha256") if meta is not None else None
    if recorded is not None and recorded != tensors_sha256(sd):
        raise BadInput(f"{p}: checkpoint corrupted: its tensors do not match the content hash written when it was "
                       "saved; restore the file or write it again")
    for name, t in sd.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise BadInput(f"{p}: tensor '{name}' holds NaN or Inf values; load finite weights (the run that "
                           "wrote them diverged)")
    return sd, meta


def tensors_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors: names (sorted), dtypes, shapes and bytes; not their storage layout."""
    h = hashlib.sha256(b"chita-edge/tensors-v1")
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """A copy with every string interned: pickle writes a repeated string once when it is the same object, so
    without this, equal metadata built differently (a history resumed from a state file) gives other bytes."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_canonical(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a chita-edge checkpoint atomically (temporary file + rename)."""
    sd = {_canonical(k): v.detach().cpu().clone() for k, v in state_dict.items()}
    meta = _canonical({"format": FORMAT, **meta, "tensors_sha256": tensors_sha256(sd)})
    buf = io.BytesIO()  # serialise in memory: a full disk then raises OSError(ENOSPC) from the plain write
    torch.save({"chita_edge": meta, "state_dict": sd}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
