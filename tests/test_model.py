"""The Llama model: presets, parameter counts, initialization, causality, document masking, MoE."""

import math
import subprocess
import sys

import pytest
import torch

from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig, get_preset
from pretrain.model.attention import document_ids, get_attention
from pretrain.model.flops import count_parameters, flops_per_token, training_memory
from pretrain.model.llama import MLP, MoE

SMALL = LlamaConfig(
    vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96, max_seq_len=64
)


def test_tinyllama_has_exactly_1_100_048_384_parameters():
    with torch.device("meta"):
        model = Llama(get_preset("tinyllama-1.1b"))
    assert model.num_parameters() == 1_100_048_384
    assert count_parameters(get_preset("tinyllama-1.1b")).total == 1_100_048_384


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "llama-120m"])
def test_parameter_formula_matches_the_built_model(name):
    with torch.device("meta"):
        model = Llama(get_preset(name))
    assert count_parameters(get_preset(name)).total == model.num_parameters()


def test_preset_sizes():
    tiny = get_preset("tiny")
    assert 1e6 < count_parameters(tiny).total < 2e7
    assert tiny.vocab_size == 8192 and 256 <= tiny.max_seq_len <= 512
    assert 1e8 < count_parameters(get_preset("llama-120m")).total < 1.5e8
    assert get_preset("tiny-moe").n_experts > 1
    with pytest.raises(UserError, match="unknown model preset 'nope'.*tinyllama-1.1b"):
        get_preset("nope")


def test_flops_per_token_formula_for_tinyllama():
    c = get_preset("tinyllama-1.1b")
    non_matmul = c.vocab_size * c.dim + (2 * c.n_layers + 1) * c.dim  # embedding lookup and norm gains
    expected = 6 * (1_100_048_384 - non_matmul) + 12 * 22 * 2048 * 2048
    assert flops_per_token(c) == expected
    assert abs(expected / 1e9 - 7.314) < 1e-3
    assert training_memory(c).states_bytes == 16 * 1_100_048_384


def test_moe_flops_count_only_active_experts():
    moe = get_preset("tiny-moe")
    dense_equivalent = moe.replace(n_experts=0)
    router = moe.dim * moe.n_experts
    expert = 3 * moe.dim * moe.mlp_hidden
    per_layer_extra = (moe.moe_top_k - 1) * expert + router
    assert flops_per_token(moe) - flops_per_token(dense_equivalent) == 6 * moe.n_layers * per_layer_extra


def test_initialization_follows_tinyllama_rule():
    # The 1.1B's width (d=2048) with fewer layers and a small vocab, so it builds fast on CPU.
    config = get_preset("tinyllama-1.1b").replace(n_layers=2, vocab_size=4096)
    torch.manual_seed(0)
    model = Llama(config)
    assert math.isclose(config.init_std, math.sqrt(2 / (5 * 2048)))
    assert abs(get_preset("tinyllama-1.1b").init_std - 0.0140) < 1e-4
    assert abs(get_preset("tinyllama-1.1b").residual_init_std - 0.0010) < 1e-4
    residual_std = 1 / (math.sqrt(2048) * 2)
    for name, param in model.named_parameters():
        std = param.float().std().item()
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
        elif name.endswith(("attn.out_proj.weight", "mlp.down.weight")):
            assert std == pytest.approx(residual_std, rel=0.02), name
        else:
            assert std == pytest.approx(config.init_std, rel=0.02), name
        if param.dim() == 2:
            assert abs(param.mean().item()) < 1e-3, name


def test_meta_device_build_then_init_matches_direct_build():
    direct = Llama(SMALL)
    torch.manual_seed(0)
    direct.init_weights()
    with torch.device("meta"):
        deferred = Llama(SMALL)
    deferred.to_empty(device="cpu")
    torch.manual_seed(0)
    deferred.init_weights()
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    assert torch.equal(direct(tokens).logits, deferred(tokens).logits)


def test_tied_embeddings_share_one_tensor():
    model = Llama(SMALL.replace(tie_embeddings=True))
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert model.num_parameters() == count_parameters(SMALL.replace(tie_embeddings=True)).total


def test_forward_backward_and_causality():
    torch.manual_seed(0)
    model = Llama(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 32))
    out = model(tokens)
    assert out.logits.shape == (2, 32, SMALL.vocab_size)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.5  # near-uniform predictions at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Changing future tokens never changes earlier logits.
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        Llama(SMALL)(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))


def test_document_ids_end_each_document_at_its_eos():
    tokens = torch.tensor([[5, 6, 0, 7, 0, 8], [0, 1, 2, 3, 0, 0]])
    assert document_ids(tokens, eos_id=0).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 2]]


@pytest.mark.parametrize("kernel", ["sdpa-math", "sdpa-flash"])  # the SDPA kernels a CPU has
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_pinned_to_one_kernel_matches_sdpa(kernel, masked):
    torch.manual_seed(0)
    q = torch.randn(2, 64, 8, 16)
    k, v = (torch.randn(2, 64, 2, 16) for _ in range(2))
    tokens = torch.randint(1, 50, (2, 64))
    tokens[0, [10, 30]] = 0
    doc_ids = document_ids(tokens, eos_id=0) if masked else None
    expected = get_attention("sdpa")(q, k, v, doc_ids)
    torch.testing.assert_close(get_attention(kernel)(q, k, v, doc_ids), expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):  # pinning is real: a kernel the CPU lacks cannot run
        get_attention("sdpa-efficient")(q, k, v, doc_ids)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_document_masking_equals_running_each_document_alone(n_kv_heads):
    torch.manual_seed(0)
    config = SMALL.replace(n_kv_heads=n_kv_heads)
    model = Llama(config).eval()
    eos = 0
    doc_a = torch.cat([torch.randint(1, config.vocab_size, (12,)), torch.tensor([eos])])
    doc_b = torch.randint(1, config.vocab_size, (19,))
    packed = torch.cat([doc_a, doc_b])[None]
    with torch.no_grad():
        masked = model(packed, doc_ids=document_ids(packed, eos)).logits[0]
        alone_a = model(doc_a[None]).logits[0]
        alone_b = model(doc_b[None]).logits[0]
        unmasked = model(packed).logits[0]
    torch.testing.assert_close(masked[: len(doc_a)], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked[len(doc_a) :], alone_b, atol=1e-5, rtol=0)
    # Without the mask the second document does see the first one.
    assert (unmasked[len(doc_a) :] - alone_b).abs().max() > 1e-3


def test_moe_with_one_expert_is_the_dense_mlp():
    config = SMALL.replace(n_experts=1, moe_top_k=1)
    moe, mlp = MoE(config), MLP(config.dim, config.mlp_hidden)
    mlp.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 7, config.dim)
    out, aux = moe(x)
    torch.testing.assert_close(out, mlp(x))
    assert aux.item() == pytest.approx(1.0)


def test_moe_routes_each_token_to_top_k_experts_weighted_by_softmax_over_selected_logits():
    torch.manual_seed(0)
    config = SMALL.replace(n_experts=4, moe_top_k=2)
    moe = MoE(config)
    x = torch.randn(5, config.dim)
    out, _ = moe(x[None])
    logits = moe.router(x)
    for t in range(5):
        top = logits[t].topk(2)
        weights = torch.softmax(top.values, dim=0)
        expected = sum(w * moe.experts[int(e)](x[t]) for w, e in zip(weights, top.indices))
        torch.testing.assert_close(out[0, t], expected, atol=1e-6, rtol=1e-5)


def test_moe_load_balancing_loss_is_one_when_balanced_and_n_experts_when_collapsed():
    config = SMALL.replace(n_experts=4, moe_top_k=1)
    moe = MoE(config)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = 100 * torch.eye(4)  # expert e reads feature e
    x = torch.zeros(1, 64, config.dim)
    x[0, torch.arange(64), torch.arange(64) % 4] = 1.0  # token t is sent to expert t % 4
    _, aux_balanced = moe(x)
    assert aux_balanced.item() == pytest.approx(1.0, abs=1e-4)
    x_collapsed = torch.zeros(1, 64, config.dim)
    x_collapsed[0, :, 0] = 1.0  # every token is sent to expert 0 with probability ~1
    _, aux_collapsed = moe(x_collapsed)
    assert aux_collapsed.item() == pytest.approx(4.0, abs=1e-4)


def test_moe_without_capacity_never_drops_and_with_capacity_drops():
    torch.manual_seed(0)
    x = torch.randn(1, 64, SMALL.dim)
    unlimited = MoE(SMALL.replace(n_experts=4, moe_top_k=1))
    out, _ = unlimited(x)
    assert (out[0].abs().sum(-1) > 0).all()
    limited = MoE(SMALL.replace(n_experts=4, moe_top_k=1, moe_capacity_factor=0.25))
    limited.load_state_dict(unlimited.state_dict())
    out_limited, _ = limited(x)
    kept = (out_limited[0].abs().sum(-1) > 0).sum().item()
    assert kept <= 4 * 4  # capacity ceil(0.25 * 64 / 4) = 4 tokens per expert
    # Tokens that were kept are computed exactly as without a limit.
    kept_rows = out_limited[0].abs().sum(-1) > 0
    torch.testing.assert_close(out_limited[0][kept_rows], out[0][kept_rows])


def test_moe_model_returns_aux_loss_and_all_experts_get_gradients():
    torch.manual_seed(0)
    model = Llama(get_preset("tiny-moe").replace(vocab_size=101, max_seq_len=32))
    out = model(torch.randint(0, 101, (2, 32)))
    assert out.aux_loss.item() >= 1.0 - 1e-6  # n_experts * sum f p >= 1 up to routing noise
    (out.logits.mean() + out.aux_loss).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name


def test_config_typos_and_bad_shapes_are_clear_errors():
    with pytest.raises(UserError, match="unknown model config field.*n_layer\\b"):
        LlamaConfig.from_dict({"n_layer": 2})
    with pytest.raises(UserError, match="divisible by n_kv_heads"):
        LlamaConfig(n_heads=32, n_kv_heads=5)
    with pytest.raises(UserError, match="attention_backend 'flashy'"):
        Llama(LlamaConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=8), "flashy")


@pytest.mark.parametrize("backend,extra", [("flash", "flash"), ("xformers", "xformers")])
def test_missing_backend_package_names_the_extra(backend, extra):
    code = (
        "import sys; sys.modules['flash_attn'] = None; sys.modules['xformers'] = None; sys.modules['xformers.ops'] = None\n"
        "import pretrain, pretrain.model, pretrain.cli\n"
        "from pretrain.errors import UserError\n"
        "from pretrain.model import Llama, LlamaConfig\n"
        "Llama(LlamaConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=8, max_seq_len=8))\n"
        f"try:\n    Llama(LlamaConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=8, max_seq_len=8), attention_backend='{backend}')\n"
        "except UserError as err:\n    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"pip install 'pretrain[{extra}]'" in result.stdout


def test_sdpa_is_always_available():
    assert get_attention("sdpa") is not None
    with pytest.raises(UserError, match="unknown attention backend"):
        get_attention("nope")
