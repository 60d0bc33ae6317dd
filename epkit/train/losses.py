"""The language-model loss without [N, V] fp32 logits: the LM head and cross-entropy applied chunk by chunk.

`linear_cross_entropy(h, weight, targets)` equals
`F.cross_entropy((h @ weight.T).float(), targets, ignore_index=IGNORE, reduction="sum")`, the loss the
training loop computed from full logits before, and has the same gradients for h and weight (bf16 logits
upcast to fp32, as there). It never holds more than one chunk of logits: the forward computes each chunk's
logits, its loss and its logit gradient (softmax - one-hot), turns that straight into the chunk's
gradients for h and weight, and drops the logits. Backward only scales the stored gradients by the
upstream gradient, so no logit is computed twice. Memory: [C, V] fp32 per chunk plus gradients the size of
h and weight (weight's summed in fp32 over chunks), instead of several [N, V] copies. The logit gradient is
cast to h's dtype before the upstream scale (1 / tokens) is applied, not after: in bf16 that moves a
gradient by at most about one rounding step; in fp32 nothing changes.

Legend: N rows (tokens), D hidden, V vocab, C rows per chunk.
"""
from __future__ import annotations

import torch

from ..data import IGNORE

CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk (256 MiB): 2097 rows of a 32000-token vocabulary


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, grads: bool):
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hs, ts = h[s:s + chunk], targets[s:s + chunk]  # [C, D], [C]
            logits = (hs @ weight.t()).float()  # [C, V]: the head's output in h's dtype, upcast as before
            valid = ts != IGNORE
            safe = torch.where(valid, ts, 0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            total += torch.where(valid, lse - logits.take_along_dim(safe, 1)[:, 0], 0.0).sum()
            if need_h or need_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, safe, torch.full_like(lse[:, None], -1.0))
                grad = grad.mul_(valid[:, None]).to(h.dtype)  # d(loss sum)/d logits, cast as autograd casts it
                if need_h:
                    grad_h[s:s + chunk] = grad @ weight
                if need_w:  # one chunk: the head's own bf16 product; more: summed in fp32
                    part = grad.t() @ hs  # [V, D]
                    grad_w = part if grad_w is None else grad_w.float().add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of cross-entropy(h @ weight.T, targets), rows with target IGNORE left out.

    h [N, D] (any leading shape, flattened), weight [V, D], targets [N] int64 -> scalar fp32.
    `chunk`: rows per chunk (default: CHUNK_ELEMENTS fp32 logits per chunk)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    if h.shape[0] != targets.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden rows but {targets.shape[0]} targets")
    grads = torch.is_grad_enabled()  # off inside forward; without it (evaluation) no gradient is computed
    return _LinearCrossEntropy.apply(h, weight, targets, chunk or chunk_rows(weight.shape[0]), grads)
