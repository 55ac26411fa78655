"""Attention kernels on a CUDA GPU: flash-attn, xformers and pinned SDPA kernels against SDPA
(skipped on CPU-only machines).

The GPU check comes first so that on a GPU machine a missing package fails in CI
(`require`), while CPU-only CI skips these tests as the only tests allowed to skip.
"""

import pytest
import torch
from helpers import require, require_gpu

from pretrain.model import Llama, LlamaConfig
from pretrain.model.attention import document_ids, get_attention

pytestmark = pytest.mark.gpu

PACKAGES = {"flash": "flash_attn", "xformers": "xformers.ops"}


@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("n_kv_heads", [8, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_sdpa(backend, n_kv_heads, masked):
    require_gpu()
    require(PACKAGES[backend])
    torch.manual_seed(0)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 256, n_kv_heads, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    doc_ids = None
    if masked:
        tokens = torch.randint(1, 50, (2, 256), device="cuda")
        tokens[0, [40, 100, 101]] = 0
        tokens[1, 200] = 0
        doc_ids = document_ids(tokens, eos_id=0)
    expected = get_attention("sdpa")(q, k, v, doc_ids)
    actual = get_attention(backend)(q, k, v, doc_ids)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kernel", ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_kernels_match_the_math_kernel_in_bf16(kernel, masked):
    """Without masking every kernel runs; with document masking flash has no mask support, cuDNN
    may or may not (depends on the cuDNN version), and the others must match."""
    require_gpu()
    torch.manual_seed(0)
    q = torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    doc_ids = None
    if masked:
        tokens = torch.randint(1, 50, (2, 512), device="cuda")
        tokens[0, [40, 300, 301]] = 0
        doc_ids = document_ids(tokens, eos_id=0)
    expected = get_attention("sdpa-math")(q.float(), k.float(), v.float(), doc_ids)
    if masked and kernel == "sdpa-flash":
        with pytest.raises(RuntimeError):
            get_attention(kernel)(q, k, v, doc_ids)
        return
    try:
        actual = get_attention(kernel)(q, k, v, doc_ids)
    except RuntimeError:
        if masked and kernel == "sdpa-cudnn":
            return
        raise
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-flash", "sdpa-cudnn", "flash", "xformers"])
def test_model_trains_in_bf16_with_backend(backend):
    require_gpu()
    if backend in PACKAGES:
        require(PACKAGES[backend])
    config = LlamaConfig(
        vocab_size=256,
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=512,
        max_seq_len=128,
    )
    model = Llama(config, attention_backend=backend).cuda()
    tokens = torch.randint(0, 256, (4, 128), device="cuda")
    doc_ids = None if backend in ("sdpa-flash", "sdpa-cudnn") else document_ids(tokens, eos_id=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens, doc_ids=doc_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
