"""Hugging Face interop: logit parity with transformers both ways, bit-exact round trips, CLI conversion."""

import json
import warnings

import pytest
import torch
from helpers import require, write_dataset

from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import ModelCheckpoint, load_model_checkpoint, save_model_checkpoint
from pretrain.model.hf import (
    client_tokenizer_json,
    config_from_hf,
    document_prefix_id,
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


def trained_tokenizer():
    """Our byte-level BPE: `<|endoftext|>` 0 (EOS), `<|bos|>` 1, `<|pad|>` 2."""
    from pretrain.data.tokenizer import train_bpe

    return train_bpe(["some text, and some more text to learn from"] * 20, 300)


def export(tmp_path, bos_id, tokenizer=None, name="out"):
    """`pretrain export-hf` of a checkpoint whose meta says `bos_id` (None: data without BOS)."""
    tokenizer = tokenizer or trained_tokenizer()
    config = LlamaConfig(**{**BASE, "vocab_size": 320}, n_heads=4, n_kv_heads=2, mlp_hidden=96)
    state = Llama(config).state_dict()
    meta = {"bos_id": bos_id, "eos_id": 0}
    save_model_checkpoint(tmp_path / f"{name}.pt", ModelCheckpoint(config, state, tokenizer.to_str(), meta))
    assert main(["export-hf", str(tmp_path / f"{name}.pt"), str(tmp_path / name)]) == 0
    return tmp_path / name


def test_export_without_bos_encodes_like_training_and_prefixes_with_eos(tmp_path):
    transformers = require("transformers")
    ours = trained_tokenizer()
    out = export(tmp_path, bos_id=None)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs("some text").input_ids == ours.encode("some text").ids  # nothing added
    # lm-eval's HFLM.prefix_token_id is the tokenizer's bos_token_id: the EOS before every document
    assert theirs.bos_token == "<|endoftext|>" and theirs.bos_token_id == theirs.eos_token_id == 0
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == document_prefix_id(None, 0) == 0
    assert config["pad_token_id"] == 2
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 0, 2)
    assert load_model_checkpoint(out).meta["bos_id"] is None  # import reads the convention back


def test_export_with_bos_prepends_it_like_training(tmp_path):
    transformers = require("transformers")
    ours = trained_tokenizer()
    out = export(tmp_path, bos_id=1)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs("some text").input_ids == [1, *ours.encode("some text").ids]
    assert theirs.bos_token == "<|bos|>" and theirs.eos_token == "<|endoftext|>"
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 0, 2)
    assert load_model_checkpoint(out).meta["bos_id"] == 1


def test_export_pads_with_the_pad_token_or_else_eos(tmp_path):
    transformers = require("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(export(tmp_path, bos_id=None))
    batch = theirs(["some text", "some"], padding=True)
    assert theirs.pad_token == "<|pad|>" and batch.input_ids[1][-1] == 2 and batch.attention_mask[1][-1] == 0
    tokenizers = require("tokenizers")
    no_pad = tokenizers.Tokenizer(tokenizers.models.BPE())
    no_pad.add_special_tokens(["<|endoftext|>"])
    no_pad.add_tokens(list("abcdefgh "))
    out = export(tmp_path, bos_id=None, tokenizer=no_pad, name="no-pad")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(["ab", "a"], padding=True).input_ids[1][-1] == 0 == theirs.pad_token_id
    assert json.loads((out / "config.json").read_text())["pad_token_id"] is None  # not padding_idx
    assert transformers.GenerationConfig.from_pretrained(out).pad_token_id == 0


def test_client_tokenizer_json_replaces_token_adding_post_processors():
    tokenizers = require("tokenizers")
    processors = tokenizers.processors
    tok = tokenizers.Tokenizer.from_str(trained_tokenizer().to_str())
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", 2)]),
        ]
    )
    plain = tok.encode("some text", add_special_tokens=False).ids
    without = tokenizers.Tokenizer.from_str(client_tokenizer_json(tok.to_str(), None))
    assert without.encode("some text").ids == plain
    assert without.post_processor.__class__.__name__ == "ByteLevel"
    with_bos = tokenizers.Tokenizer.from_str(client_tokenizer_json(tok.to_str(), 1))
    assert with_bos.encode("some text").ids == [1, *plain]
    assert with_bos.encode("some", "text").ids == [
        1,
        *without.encode("some").ids,
        1,
        *without.encode("text").ids,
    ]
    with pytest.raises(UserError, match="BOS id 999 is not in its tokenizer"):
        client_tokenizer_json(tok.to_str(), 999)


def test_export_writes_the_weights_dtype(tmp_path):
    transformers = require("transformers")
    config = CONFIGS["gqa"]
    save_hf(tmp_path, {k: v.bfloat16() for k, v in Llama(config).state_dict().items()}, config)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))


def test_checkpoint_bos_id_is_set_only_when_the_data_has_bos(tmp_path):
    from pretrain.train.datamodule import PretrainDataModule

    def bos_id(with_bos: bool) -> int | None:
        root = write_dataset(tmp_path / f"bos-{with_bos}", [256])
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["tokenizer"]["bos_id"] = 1  # the tokenizer has a BOS either way
        manifest["settings"]["bos"] = with_bos
        (root / "manifest.json").write_text(json.dumps(manifest))
        data = PretrainDataModule(
            {"a": {"path": str(root)}}, seq_len=8, global_batch_tokens=64, verify_shards=0
        )
        data.setup("fit")
        return data.bos_id

    assert bos_id(with_bos=False) is None
    assert bos_id(with_bos=True) == 1


def test_import_refuses_sliding_window_attention(tmp_path, capsys):
    hf = hf_config(CONFIGS["gqa"]) | {"max_position_embeddings": 32768, "sliding_window": 4096}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "config.json: sliding_window 4096" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="use_sliding_window|sliding_window 4096"):
        config_from_hf(hf | {"use_sliding_window": True})
    full = (
        {"sliding_window": None},
        {"sliding_window": 32768},
        {"sliding_window": 4096, "use_sliding_window": False},
    )
    for fields in full:  # a window no shorter than the context, or none, is full attention
        assert config_from_hf(hf | fields).max_seq_len == 32768


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
