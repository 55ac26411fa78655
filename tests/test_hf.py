"""Hugging Face interop: logit parity with transformers both ways, bit-exact round trips, CLI conversion."""

import json
import warnings

import pytest
import torch
from helpers import require

from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import ModelCheckpoint, load_model_checkpoint, save_model_checkpoint
from pretrain.model.hf import (
    config_from_hf,
    from_hf_state_dict,
    hf_config,
    save_hf,
    to_hf_state_dict,
)

BASE = dict(vocab_size=113, dim=64, n_layers=3, max_seq_len=64, rope_base=5000.0, norm_eps=1e-5)
CONFIGS = {
    "gqa": LlamaConfig(**BASE, n_heads=4, n_kv_heads=2, mlp_hidden=96),
    "mha": LlamaConfig(**BASE, n_heads=4, n_kv_heads=4, mlp_hidden=96),
    "mqa-tied": LlamaConfig(**BASE, n_heads=8, n_kv_heads=1, mlp_hidden=80, tie_embeddings=True),
    "moe": LlamaConfig(**BASE, n_heads=4, n_kv_heads=2, mlp_hidden=48, n_experts=4, moe_top_k=2),
}
TOLERANCE = 1e-4


def hf_class(config: LlamaConfig):
    transformers = require("transformers")
    return transformers.MixtralForCausalLM if config.is_moe else transformers.LlamaForCausalLM


def random_tokens(config: LlamaConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_ours_to_hf_logit_parity(kind, tmp_path):
    config = CONFIGS[kind]
    torch.manual_seed(0)
    ours = Llama(config).eval()
    save_hf(tmp_path, ours.state_dict(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any loading warning fails the test
        theirs, info = hf_class(config).from_pretrained(
            tmp_path, dtype=torch.float32, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = random_tokens(config)
    with torch.no_grad():
        diff = (ours(tokens).logits - theirs.eval()(tokens).logits).abs().max().item()
    print(f"{kind}: ours -> HF max |logit diff| = {diff:.3g}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_hf_to_ours_logit_parity_and_bit_exact_round_trips(kind):
    config = CONFIGS[kind]
    transformers = require("transformers")
    hf_cfg_class = transformers.MixtralConfig if config.is_moe else transformers.LlamaConfig
    hf_cfg = hf_cfg_class(
        **{k: v for k, v in hf_config(config).items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(0)
    theirs = hf_class(config)(hf_cfg).eval()
    hf_state = theirs.state_dict()
    assert config_from_hf(hf_cfg.to_dict()) == config

    ours = Llama(config).eval()
    ours.load_state_dict(from_hf_state_dict(hf_state, config))
    tokens = random_tokens(config)
    with torch.no_grad():
        diff = (ours(tokens).logits - theirs(tokens).logits).abs().max().item()
    print(f"{kind}: HF -> ours max |logit diff| = {diff:.3g}")
    assert diff < TOLERANCE

    # ours -> HF (per-expert layout for MoE) -> ours is bit-exact.
    our_state = ours.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(our_state, config), config)
    assert back.keys() == our_state.keys()
    assert all(torch.equal(back[k], our_state[k]) for k in our_state)
    if not config.is_moe:  # dense layouts are identical, so HF -> ours -> HF is bit-exact too
        again = to_hf_state_dict(our_state, config)
        expected = {
            k: v for k, v in hf_state.items() if not (config.tie_embeddings and k == "lm_head.weight")
        }
        assert again.keys() == expected.keys()  # a tied head is not stored twice, as in save_pretrained
        assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_hf_save_pretrained_directory_imports_via_cli(tmp_path, capsys):
    transformers = require("transformers")
    config = CONFIGS["gqa"]
    hf_cfg = transformers.LlamaConfig(
        **{
            k: v
            for k, v in hf_config(config, bos_id=1, eos_id=2).items()
            if k not in ("architectures", "model_type")
        }
    )
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours.pt")]) == 0
    checkpoint = load_model_checkpoint(tmp_path / "ours.pt")
    assert checkpoint.config == config
    assert checkpoint.meta["eos_id"] == 2 and checkpoint.meta["source"]["kind"] == "huggingface"
    ours = Llama(checkpoint.config).eval()
    ours.load_state_dict(checkpoint.state_dict)
    tokens = random_tokens(config)
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() < TOLERANCE


def test_export_hf_cli_writes_loadable_model_with_tokenizer(tmp_path, capsys):
    transformers = require("transformers")
    tokenizers = require("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.add_special_tokens(["<|bos|>", "<|endoftext|>"])
    tok.add_tokens(list("abcdefgh "))
    config = CONFIGS["gqa"]
    torch.manual_seed(0)
    ours = Llama(config).eval()
    meta = {"bos_id": 0, "eos_id": 1}
    save_model_checkpoint(tmp_path / "ck.pt", ModelCheckpoint(config, ours.state_dict(), tok.to_str(), meta))
    assert main(["export-hf", str(tmp_path / "ck.pt"), str(tmp_path / "out")]) == 0
    assert "with tokenizer" in capsys.readouterr().out
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = random_tokens(config)
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() < TOLERANCE
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.bos_token == "<|bos|>"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 1


def test_plain_state_dict_needs_a_preset(tmp_path):
    torch.save(Llama(CONFIGS["gqa"]).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="--preset"):
        load_model_checkpoint(tmp_path / "plain.pt")
    tiny_state = Llama(
        LlamaConfig.from_dict({**BASE, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 96})
    ).state_dict()
    torch.save(tiny_state, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="unknown model preset"):
        load_model_checkpoint(tmp_path / "plain.pt", preset="huge")


def test_conversion_errors_are_clear(tmp_path, capsys):
    assert main(["export-hf", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01not a checkpoint")
    assert main(["export-hf", str(tmp_path / "garbage.pt"), str(tmp_path / "out")]) == 2
    assert "could not be read" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "x.pt")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        load_model_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(CONFIGS["gqa"])))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model_checkpoint(tmp_path / "hf")
    with pytest.raises(UserError, match="no tensor 'model.layers.0.self_attn.q_proj.weight'"):
        from_hf_state_dict(
            {
                "model.embed_tokens.weight": torch.zeros(1),
                "model.norm.weight": torch.zeros(1),
                "lm_head.weight": torch.zeros(1),
            },
            CONFIGS["gqa"],
        )


def test_model_info_cli(capsys):
    assert main(["model-info", "tinyllama-1.1b"]) == 0
    out = capsys.readouterr().out
    assert "1,100,048,384" in out and "7.314 GFLOP" in out
    assert main(["model-info", "nope"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
