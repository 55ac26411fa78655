"""Next-token cross-entropy through the LM head, plain or in chunks that never hold all the logits.

At seq 2048 and a 32k vocabulary the logits of one micro-batch of 8 are 8 x 2048 x 32000 values:
1 GiB in bf16, plus the float32 log-softmax (2 GiB) that the plain form keeps for backward. The
chunked form computes, for one chunk of tokens at a time, the logits, the loss and right away the
gradients of the loss with respect to the hidden states and the LM-head weight (softmax minus
one-hot, over the token count), then drops the chunk's logits. Backward only scales the stored
gradients by the incoming gradient. It does the same matmuls as the plain form (one forward,
two backward per chunk) with the same precision rules (matmuls in the autocast dtype, softmax in
float32), so only the summation order differs. The stored gradients are float32 and the 1/N
is applied in float32, so that nothing underflows before a loss scale (fp16) multiplies them.

`auto_chunk_tokens` is the automatic choice (`model.loss_chunk_tokens: auto`, the default of
`pretrain fit`): chunks whose logits hold about `AUTO_CHUNK_LOGITS` values (2^23: 32 MiB in
float32; 1024 tokens at a vocabulary of 8192, 256 at 32000) once a micro-batch's logits are larger
than that. On 2 CPU cores at the `tiny` shape (2048 tokens x 8192) this was measured faster than
the plain form (docs/performance.md); on a GPU it bounds the logits' memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

AUTO_CHUNK_LOGITS = 2**23


def auto_chunk_tokens(n_tokens: int, vocab_size: int) -> int | None:
    """Tokens per chunk for `n_tokens` tokens over `vocab_size` logits: the largest power of two
    whose chunk holds at most `AUTO_CHUNK_LOGITS` logits (at least 128 tokens), or None (no
    chunking) when the logits of all `n_tokens` fit in one such chunk."""
    if n_tokens * vocab_size <= AUTO_CHUNK_LOGITS:
        return None
    chunk = max(128, 1 << max(0, (AUTO_CHUNK_LOGITS // vocab_size).bit_length() - 1))
    return None if chunk >= n_tokens else chunk


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (logits) against `targets`.

    hidden (N, d), weight (vocab, d), targets (N,). With `chunk_tokens`, logits exist only for
    that many tokens at a time (module docstring); None computes them all at once."""
    if chunk_tokens is None:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = F.linear(hidden[start : start + chunk_tokens], weight).float()
        loss_sum += F.cross_entropy(logits, targets[start : start + chunk_tokens], reduction="sum")
    return loss_sum / hidden.shape[0]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both input gradients chunk by chunk in forward; backward scales the stored gradients."""

    @staticmethod
    def forward(
        ctx: Any,  # FunctionCtx's stubs lack needs_input_grad, saved_tensors and custom attributes
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        n_tokens = hidden.shape[0]
        want_weight_grad = ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight_grad else None
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        w = None
        for start in range(0, n_tokens, chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            t = targets[start : start + chunk_tokens]
            logits = F.linear(h, weight)  # autocast dtype, as in the plain form
            if w is None:
                w = weight.to(logits.dtype)  # one cast for all chunks
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            loss_sum -= log_probs.gather(1, t[:, None]).sum()
            grad_logits = log_probs.exp_()  # softmax - one_hot; the 1/N comes later, in float32
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(logits.dtype)
            grad_hidden[start : start + chunk_tokens] = (grad_logits @ w).float() / n_tokens
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h.to(logits.dtype)).float() / n_tokens
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss_sum / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_loss.float()
        weight_grad = None if grad_weight is None else (grad_weight * scale).to(weight_dtype)
        return (grad_hidden * scale).to(hidden_dtype), weight_grad, None, None
