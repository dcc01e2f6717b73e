"""Layer-wise OBS re-fit: statistics of each Conv2d/Linear layer's inputs on calibration data (``layer_inputs``,
Gram matrices, ``LayerStats``) and ``layerwise_refit``, which re-fits every layer of a pruned model, in execution
order, so that its output matches the dense model's output of the same layer.
"""

from __future__ import annotations

import torch
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.solvers.group_chita import layer_backsolve, masked_layer_backsolve


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of its weight's columns: im2col for Conv2d (column c*kh*kw + j), features for Linear."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        cols = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise BadInput(f"layer-wise re-fit supports Conv2d (zero padding) and Linear layers, not {type(mod).__name__}")


def _refittable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and mod.padding_mode == "zeros" and not isinstance(mod.padding, str))


def _gram(mod: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H = X^T X and C = X^T Y (float64), accumulated over batches and row chunks."""
    H: torch.Tensor | None = None
    C: torch.Tensor | None = None
    for i, x in enumerate(xs):
        X = _columns(mod, x)
        Y = _columns(mod, ys[i]) if ys is not None else None
        for s in range(0, X.shape[0], chunk):  # float32 products per chunk, float64 sums
            xb = X[s:s + chunk].float()
            h = (xb.T @ xb).double()
            H = h if H is None else H + h
            if Y is not None:
                c = (xb.T @ Y[s:s + chunk].float()).double()
                C = c if C is None else C + c
    assert H is not None
    return H, C


def _output_sq_norm(mod: nn.Module, xs: list[torch.Tensor], W: torch.Tensor, chunk: int = 8192) -> float:
    """||X W^T||^2 (float64 sum) over the layer inputs ``xs``; W is (out, q) in the layout of ``_columns``."""
    total = 0.0
    Wt = W.T.float()
    for x in xs:
        X = _columns(mod, x)
        for s in range(0, X.shape[0], chunk):
            total += float((X[s:s + chunk].float() @ Wt).double().pow(2).sum())
    return total


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor, batch: int = 128) -> dict[str, list[torch.Tensor]]:
    """The inputs of the named modules on ``x`` (eval mode), per batch."""
    mods = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: out[n].append(a[0].detach())) for n in names]
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return out


class LayerStats:
    """Statistics of the layer-wise problems on fixed calibration inputs ``x``, shared across stages.

    ``dense_inputs[name]``: each Conv2d/Linear's input in the dense model (computed once);
    ``dense_gram[name]`` = X_d^T X_d (once); ``gram[name]`` = X_p^T X_p of the current pruned model, filled in by
    ``layerwise_refit`` (after a re-fit, layer l's inputs no longer change until the next stage) so that the
    next stage's ``removal_curves`` need not recompute it.
    """

    def __init__(self, dense: nn.Module, x: torch.Tensor, batch: int = 256, names: list[str] | None = None):
        self.x = x
        self.names = [n for n, m in dense.named_modules() if _refittable(m) and (names is None or n in names)]
        self.dense_modules = dict(dense.named_modules())
        self.dense_inputs = layer_inputs(dense, self.names, x, batch)
        self.dense_gram: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}

    def dense_H(self, name: str) -> torch.Tensor:
        if name not in self.dense_gram:
            self.dense_gram[name] = _gram(self.dense_modules[name], self.dense_inputs[name])[0]
        return self.dense_gram[name]


@torch.no_grad()
def layerwise_refit(model: nn.Module, dense: nn.Module, x: torch.Tensor, *, damp: float = 0.01,
                    stats: LayerStats | None = None, elementwise: bool = False) -> dict[str, float]:
    """Sequentially re-fit every Conv2d (groups 1) and Linear of ``model`` so that, on ``x``, its output matches
    the dense model's output of the same layer (``layer_backsolve`` with the pruned inputs X_p and the dense
    target X_d W_dense^T). Zero columns (removed input channels) and zero rows (removed outputs) stay zero.
    Layers are re-fitted in execution order, each seeing the already re-fitted layers before it. Returns the
    relative output error of each layer after the re-fit (on ``x``). ``stats`` (same ``x``) caches the dense
    side and receives the current Gram matrices. ``elementwise``: every zero weight stays zero and each output
    row is re-fitted on its own support (unstructured or block sparsity; ``masked_layer_backsolve``)."""
    st = stats if stats is not None else LayerStats(dense, x)
    dmods = st.dense_modules
    errs: dict[str, float] = {}
    mods = dict(model.named_modules())

    def pre(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
        if dmods[name].weight.shape != mod.weight.shape:
            return
        Wc = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        Wd = dmods[name].weight.detach().reshape(Wc.shape[0], -1).double()
        H, C = _gram(mod, [args[0]], [torch.cat(st.dense_inputs[name])])
        assert C is not None
        st.gram[name] = H
        keep = Wc.abs().sum(0) > 0
        rows = Wc.abs().sum(1) > 0
        lam = damp * float(H.diagonal().mean()) + 1e-12
        if elementwise:
            Wn = masked_layer_backsolve(H, C, Wd, Wc != 0, lam)
        else:
            Wn = layer_backsolve(H, C, Wd, keep, lam)
            Wn[~rows] = 0.0
        target = _output_sq_norm(mod, st.dense_inputs[name], Wd)  # ||X_d Wd^T||^2, cheaper than X_d^T X_d

        def err(Wx: torch.Tensor) -> float:  # ||X_p Wx^T - X_d Wd^T||^2 = tr(Wx H Wx^T) - 2 tr(Wx C Wd^T) + |Y|^2
            return float(torch.einsum("oi,ij,oj->", Wx, H, Wx) - 2 * torch.einsum("oi,ij,oj->", Wx, C, Wd) + target)

        before, after = err(Wc.double()), err(Wn)
        if after < before:
            mod.weight.copy_(Wn.reshape(mod.weight.shape).to(mod.weight.dtype))
        errs[name] = min(after, before) / max(target, 1e-30)

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)) for n in st.names if n in mods]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return errs


__all__ = ["LayerStats", "layer_inputs", "layerwise_refit"]
