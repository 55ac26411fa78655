"""Causal self-attention kernels behind one function, with optional per-document masking.

`attention(q, k, v, backend, doc_ids)` takes q of shape (B, T, H, D) and k, v of shape
(B, T, H_kv, D) (grouped-query attention: query head h reads kv head h // (H / H_kv)) and
returns (B, T, H, D). `doc_ids` (B, T), when given, numbers the documents packed into each
row; a token then attends only to earlier tokens of its own document.

Backends:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (PyTorch picks flash / cuDNN /
  memory-efficient / math kernels); document masking uses an explicit boolean mask.
- "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math": SDPA pinned to one kernel (to compare
  them; a kernel that cannot take the inputs raises PyTorch's "no available kernel" error, e.g.
  sdpa-flash with document masking). cuDNN and memory-efficient get kv heads expanded to query heads.
- "flash": `flash_attn_func`, and `flash_attn_varlen_func` over document boundaries
  (the `flash` extra; CUDA, fp16/bf16 only).
- "xformers": `memory_efficient_attention` with a (block-diagonal) causal mask (the `xformers` extra).
A backend whose package is missing raises a `UserError` naming the extra to install, when the
model is built, never at `import pretrain`.

`masked_attention(q, k, v, mask)` attends under an explicit boolean mask with SDPA, whatever the
training backend: decoding with a KV cache uses it (`pretrain.model.llama.KVCache`), where T new
queries read S >= T cached keys and the mask says which (causal, and not left padding).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.errors import UserError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

_PACKAGES = {"flash": ("flash_attn", "flash"), "xformers": ("xformers.ops", "xformers")}


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number the documents in each row: a document ends with (and includes) its EOS token."""
    is_eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=-1) - is_eos


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, T, H, D) attends to k, v (B, S, H_kv, D) where `mask` (B, 1, T, S) is True (SDPA)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    if doc_ids is not None:
        seq_len = q.shape[1]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        return masked_attention(q, k, v, (causal & same_doc)[:, None])
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _segment_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of equal ids in each row, rows concatenated (host sync: one `nonzero`)."""
    batch, seq_len = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_positions = starts.flatten().nonzero().flatten()
    ends = torch.cat([start_positions[1:], start_positions.new_tensor([batch * seq_len])])
    return ends - start_positions


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True)
    batch, seq_len = q.shape[:2]
    lengths = _segment_lengths(doc_ids)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    flat = [x.reshape(batch * seq_len, *x.shape[2:]) for x in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, seq_len, seq_len, causal=True)
    return out.view(q.shape)


def _xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
) -> torch.Tensor:
    from xformers.ops import LowerTriangularMask, memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    batch, seq_len, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    if group > 1:  # expand kv heads to query heads (a view, no copy until the kernel needs it)
        k, v = (x.unsqueeze(3).expand(-1, -1, -1, group, -1).reshape(q.shape) for x in (k, v))
    if doc_ids is None:
        return memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask())
    bias = BlockDiagonalCausalMask.from_seqlens(_segment_lengths(doc_ids).tolist())
    flat = [x.reshape(1, batch * seq_len, n_heads, head_dim) for x in (q, k, v)]
    return memory_efficient_attention(*flat, attn_bias=bias).view(q.shape)


def _pinned_sdpa(kernel: SDPBackend) -> AttentionFn:
    """SDPA restricted to one kernel."""
    gqa_native = kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        group = q.shape[2] // k.shape[2]
        if group > 1 and not gqa_native:
            k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
        with sdpa_kernel(kernel):
            return _sdpa(q, k, v, doc_ids)

    return attend


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": _sdpa,
    "sdpa-flash": _pinned_sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": _pinned_sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa-efficient": _pinned_sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-math": _pinned_sdpa(SDPBackend.MATH),
    "flash": _flash,
    "xformers": _xformers,
}


def get_attention(backend: str) -> AttentionFn:
    """The attention function for `backend`; a clear error if its optional package is missing."""
    if backend not in BACKENDS:
        raise UserError(
            f"unknown attention backend: attention_backend {backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if backend in _PACKAGES:
        module, extra = _PACKAGES[backend]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(
                f"attention backend {backend!r} needs the {module.split('.')[0]} package, which is not "
                f"importable ({err}); install it with: pip install 'pretrain[{extra}]', or use attention_backend: sdpa"
            ) from None
    return BACKENDS[backend]
