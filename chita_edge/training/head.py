"""Conditioning of the output layer before fine-tuning (``condition_head``).

A layer-wise re-fit after structured pruning (``chita_edge.pruning.refit``) solves the output layer by least
squares on the pruned model's features. After channels or whole residual blocks are removed those features are
nearly collinear (ResNet20 at 0.35x dense on the CIFAR-10 subset: the Gram matrix of the 32 pooled features has a
condition number of ~6000), and the exact solution uses it: the classifier's weights came out 8x the dense
model's (rms 4.5 vs 0.53, largest 14). One-shot that is the most accurate head; for training it is not. The
logits' gradient reaches the features multiplied by those weights, so the whole backbone sees steps ~8x larger
than the dense model's recipe assumes, and the first epoch at lr 0.05 threw the model from 51.5 % to 22.8 %
(loss 15.5; the eighth session's 20 epochs ended below one-shot, 44.8 -> 36.8 %). ``condition_head`` re-fits the output Linear to its own
outputs with a ridge, W' = argmin ||[F 1][W b]^T - F W^T - b||^2 + lam ||W||^2 (the bias unpenalised,
lam = ``damp`` x the mean of diag(F^T F)): the function on the training features' strong directions is kept, the
weights along their weak (collinear) directions shrink. On that ResNet20, damp 0.3 brought the weights to rms 1.1
at two points of one-shot accuracy (51.5 -> 49.6 %); three epochs at lr 0.02 then reached 69.2 % instead of
64.5 %, and 20 epochs of the budget path's recipe (``chita_edge.budget.config.FINETUNE``, which turns it on)
80.4 % (docs/finetune.md, "After a budget prune").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _output_linear(model: nn.Module, xb: torch.Tensor) -> tuple[str, nn.Linear, torch.Tensor] | None:
    """(name, module, its inputs on ``xb``) of the Linear whose output is the model's output, or None."""
    seen: list[tuple[str, nn.Linear, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.append((n, m, a[0].detach(), o.detach())))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        out = model(xb)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(out, torch.Tensor) or not seen:
        return None
    name, mod, x_in, o = seen[-1]
    if o.shape != out.shape or not torch.equal(o, out) or x_in.dim() != 2:
        return None
    return name, mod, x_in


@torch.no_grad()
def condition_head(model: nn.Module, x: torch.Tensor, *, damp: float, samples: int = 2048,
                   batch_size: int = 256) -> dict[str, Any] | None:
    """Ridge re-fit of ``model``'s output Linear to its own outputs on ``x[:samples]`` (eval mode), in place.

    Returns a record (layer, weight rms before/after, the relative change of the outputs on those inputs and the
    share of them whose top-1 class is unchanged), or None when ``damp`` is 0 or the model's output is not a
    Linear's (then nothing changes)."""
    if damp <= 0 or len(x) == 0:
        return None
    was = model.training
    model.eval()
    try:
        feats: list[torch.Tensor] = []
        found = None
        for i in range(0, min(samples, len(x)), batch_size):
            found = _output_linear(model, x[i:min(i + batch_size, samples)])
            if found is None:
                return None
            feats.append(found[2])
    finally:
        model.train(was)
    assert found is not None
    name, head, _ = found
    F = torch.cat(feats).double()
    W = head.weight.detach().double()
    b = head.bias.detach().double() if head.bias is not None else torch.zeros(W.shape[0], dtype=F.dtype)
    Y = F @ W.T + b
    Fa = torch.cat([F, torch.ones(len(F), 1, dtype=F.dtype)], 1) if head.bias is not None else F
    H = Fa.T @ Fa
    lam = damp * float(H.diagonal()[:F.shape[1]].mean())
    R = torch.zeros_like(H)
    R.diagonal()[:F.shape[1]] = lam
    A, rhs = H + R, Fa.T @ Y
    L, info = torch.linalg.cholesky_ex(A)  # positive definite: the ridge on the weights, the bias column's ones
    sol = torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.lstsq(A, rhs).solution  # (in [+1], out)
    Wn = sol[:F.shape[1]].T
    Yn = F @ Wn.T + (sol[-1] if head.bias is not None else 0.0)
    head.weight.copy_(Wn.to(head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_(sol[-1].to(head.bias.dtype))
    return {"layer": name, "damp": damp, "samples": len(F),
            "weight_rms_before": float(W.pow(2).mean().sqrt()), "weight_rms_after": float(Wn.pow(2).mean().sqrt()),
            "output_change": float((Yn - Y).norm() / Y.norm().clamp_min(1e-30)),
            "top1_kept": float((Yn.argmax(1) == Y.argmax(1)).double().mean())}


__all__ = ["condition_head"]
