"""Chunked cross-entropy and selective activation checkpointing: same numbers, less memory kept.

Chunked cross-entropy must give the plain loss and gradients while never keeping the logits for
backward; selective checkpointing must give the same gradients while recomputing in backward the
element-wise ops (and no matmul), and full checkpointing must recompute the matmuls too.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.model import Llama, LlamaConfig
from pretrain.model.loss import linear_cross_entropy
from pretrain.train.parallelize import checkpointed

CONFIG = LlamaConfig(
    vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128, max_seq_len=64
)


def model_and_batch(seed: int = 0) -> tuple[Llama, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = Llama(CONFIG)
    tokens, targets = torch.randint(0, CONFIG.vocab_size, (2, 2, 64))
    return model, tokens, targets


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def saved_bytes(fn) -> tuple[object, int]:
    """Run fn() and count the bytes autograd keeps for backward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return fn(), total


@pytest.mark.parametrize("chunk_tokens", [1, 37, 128, 10_000])
def test_chunked_cross_entropy_matches_plain_loss_and_gradients(chunk_tokens):
    model, tokens, targets = model_and_batch()
    plain = model(tokens, targets=targets)
    plain.loss.backward()
    expected = gradients(model)
    model.zero_grad()
    chunked = model(tokens, targets=targets, loss_chunk_tokens=chunk_tokens)
    assert chunked.logits is None
    chunked.loss.backward()
    assert abs(chunked.loss.item() - plain.loss.item()) < 1e-6
    for got, want in zip(gradients(model), expected):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


def test_chunked_cross_entropy_scales_the_incoming_gradient_and_works_under_autocast():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    (3.0 * linear_cross_entropy(hidden, weight, targets)).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3.0 * linear_cross_entropy(hidden, weight, targets, chunk_tokens=7)).backward()
    torch.testing.assert_close((hidden.grad, weight.grad), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = linear_cross_entropy(hidden, weight, targets)
        chunked = linear_cross_entropy(hidden, weight, targets, chunk_tokens=7)
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - plain.item()) < 1e-2 * plain.item()  # bf16 logits either way
    with torch.no_grad():  # evaluation: no gradients computed, same loss
        assert abs(linear_cross_entropy(hidden, weight, targets, chunk_tokens=7) - plain.float()) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_cross_entropy_gradients_under_autocast_match_plain_without_underflow(dtype):
    """Under autocast the gradients match the plain form's, also with fp16's loss scale: the
    1/N of the mean is applied in float32, so tiny softmax gradients do not flush to zero."""
    torch.manual_seed(0)
    hidden = torch.randn(512, 64, requires_grad=True)
    weight = (0.02 * torch.randn(4096, 64)).requires_grad_()
    targets = torch.randint(0, 4096, (512,))
    grads = {}
    for chunk_tokens in (None, 100):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=dtype):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens)
        (65536.0 * loss).backward()  # the scale a GradScaler applies in fp16 training
        grads[chunk_tokens] = hidden.grad.clone(), weight.grad.clone()
    (plain_hidden, plain_weight), (hidden_grad, weight_grad) = grads[None], grads[100]
    assert (hidden_grad - plain_hidden).norm() < 2e-2 * plain_hidden.norm()
    assert (weight_grad - plain_weight).norm() < 2e-2 * plain_weight.norm()
    assert (weight_grad == 0).float().mean() <= (plain_weight == 0).float().mean() + 1e-3


def test_chunked_cross_entropy_with_a_frozen_head_computes_no_head_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16)  # frozen (e.g. LLaMA Pro trains only new blocks)
    targets = torch.randint(0, 300, (50,))
    linear_cross_entropy(hidden, weight, targets).backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    linear_cross_entropy(hidden, weight, targets, chunk_tokens=7).backward()
    torch.testing.assert_close(hidden.grad, expected)
    assert weight.grad is None


def test_chunked_cross_entropy_keeps_no_logits_for_backward():
    model, tokens, targets = model_and_batch()
    _, plain = saved_bytes(lambda: model(tokens, targets=targets))
    _, chunked = saved_bytes(lambda: model(tokens, targets=targets, loss_chunk_tokens=32))
    logits_bytes = tokens.numel() * CONFIG.vocab_size * 4
    assert plain - chunked >= logits_bytes  # the float32 logits (at least) are gone


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str) -> tuple[Counter[str], list[torch.Tensor]]:
    """Ops run during backward, and the gradients, with `mode` activation checkpointing."""
    model, tokens, targets = model_and_batch()
    if mode != "none":
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpointed(block, selective=mode == "selective")
    loss = model(tokens, targets=targets).loss
    with OpCounter() as counter:
        loss.backward()
    return counter.counts, gradients(model)


def test_selective_checkpointing_recomputes_elementwise_ops_but_no_matmul():
    none, expected = backward_ops("none")
    selective, got_selective = backward_ops("selective")
    full, got_full = backward_ops("full")
    for got in (got_selective, got_full):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    assert none["rsqrt"] == 0 and selective["rsqrt"] == full["rsqrt"] == 2 * CONFIG.n_layers  # norms
    assert selective["silu"] == full["silu"] == CONFIG.n_layers
    assert selective["mm"] == none["mm"]  # matmul outputs were kept
    assert full["mm"] > none["mm"]  # full recomputes the block's matmuls


def test_automatic_loss_chunks_only_large_logits_and_gives_the_plain_loss(capsys):
    """`loss_chunk_tokens: auto` (the default) chunks 2048 tokens x 8192 logits (1024 at a time), not
    1024 x 8192, says so once, and its loss and gradients are the plain ones."""
    from pretrain.model.loss import auto_chunk_tokens
    from pretrain.train.module import PretrainModule

    assert auto_chunk_tokens(1024, 8192) is None
    assert auto_chunk_tokens(2048, 8192) == 1024
    assert auto_chunk_tokens(8 * 2048, 32000) == 256
    module = PretrainModule(model_overrides={"max_seq_len": 256, "n_layers": 1}, seed=0)
    module.configure_model()
    assert module.hparams["loss_chunk_tokens"] == "auto"
    tokens, targets = torch.randint(0, 8192, (2, 8, 256), generator=torch.Generator().manual_seed(0))
    chunked = module._forward(tokens, targets)
    assert chunked.logits is None  # the chunked form never builds the logits
    chunked.loss.backward()
    expected = gradients(module.model)
    module.model.zero_grad()
    plain = module.model(tokens, targets=targets)
    plain.loss.backward()
    assert abs(chunked.loss.item() - plain.loss.item()) < 1e-5
    for got, want in zip(gradients(module.model), expected):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    module._forward(tokens, targets)
    message = capsys.readouterr().err.strip().splitlines()
    assert message == [
        "model.loss_chunk_tokens auto: cross-entropy 1024 tokens at a time "
        "(logits of a micro-batch: 2,048 tokens x 8,192 vocabulary, more than 2^23)"
    ]
    module._forward(tokens[:, :4], targets[:, :4])  # 1024 tokens: not chunked, nothing said
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("setting", [0, -5, "Auto", 2.5])
def test_a_loss_chunk_setting_that_is_no_token_count_is_refused_in_one_line(setting):
    from pretrain.errors import UserError
    from pretrain.train.module import PretrainModule

    with pytest.raises(
        UserError, match="model.loss_chunk_tokens must be a positive token count, auto or null"
    ):
        PretrainModule(loss_chunk_tokens=setting)
