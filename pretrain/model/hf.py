"""Conversion between our Llama and Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM`.

Weights map one to one except for two fused projections, which are split / concatenated:
`attn.qkv` <-> `self_attn.{q,k,v}_proj` and `gate_up` <-> `mlp.{gate,up}_proj`. Both sides use
the same RoPE layout (rotate_half: dimension i pairs with i + head_dim/2), so q/k rows need no
permutation; Meta's original interleaved checkpoints are permuted by HF's own converter before
they reach either of us.

MoE experts are written in the per-expert layout of Mixtral checkpoints on the Hub
(`block_sparse_moe.experts.{e}.w1|w2|w3`: gate, down, up), which transformers 4.x loads as is
and 5.x converts on load; reading accepts that layout and 5.x's fused in-memory one
(`mlp.experts.gate_up_proj` (E, 2I, D), `mlp.experts.down_proj` (E, D, I)).

Special tokens, as HF clients read them (lm-eval's `hf` backend, `generate`, pipelines): a
checkpoint's `bos_id` is the BOS that training put before every document, None when the data had
none (`doc EOS doc EOS ...`). The token before every document is the document prefix: that BOS,
or else EOS (GPT-2's convention). An export names the prefix `bos_token` / `bos_token_id`, and its
tokenizer.json prepends BOS to a text only when training did (`client_tokenizer_json`), so
`tokenizer(text)` gives the ids training saw at a document start. The pad token is the
tokenizer's own (`<|pad|>`, ...) or else EOS, which config.json then leaves unset (transformers
would freeze that embedding as `padding_idx`).

Nothing here imports `transformers`: the JSON files are written as such and weights are safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pretrain.data.tokenizer import find_pad
from pretrain.errors import UserError, writing
from pretrain.files import write_atomic, write_atomic_with
from pretrain.model.config import LlamaConfig
from pretrain.progress import progress

Tensors = dict[str, torch.Tensor]
TOKEN_ADDING_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def hf_config(
    c: LlamaConfig,
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
    pad_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM` (or `MixtralForCausalLM` when the model is a MoE); the
    ids are written as given (HF meaning: `bos_id` is the document prefix)."""
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if c.is_moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if c.is_moe else "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},  # transformers 5.x
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,  # transformers 5.x
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if c.is_moe:
        config.update(num_local_experts=c.n_experts, num_experts_per_tok=c.moe_top_k, router_jitter_noise=0.0)
    else:
        config["mlp_bias"] = False
    return config


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """Our config from an HF config.json dict; refuses features our model does not implement."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mixtral"):
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported (expected 'llama' or 'mixtral')"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        f"rope type {rope_type!r}": rope_type != "default",
        f"sliding_window {hf.get('sliding_window')} (< max_position_embeddings)": _sliding(hf),
    }
    for feature, present in unsupported.items():
        if present:
            raise UserError(f"{source}: {feature} is not supported by pretrain's Llama")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise UserError(f"{source}: head_dim * num_attention_heads must equal hidden_size")
    values: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "dim": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "mlp_hidden": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if model_type == "mixtral":
        values.update(n_experts=hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"])
    return LlamaConfig(**values)


def _sliding(hf: dict[str, Any]) -> bool:
    """Whether the config asks for sliding-window attention (a window shorter than the context)."""
    window = hf.get("sliding_window")
    if window is None or not hf.get("use_sliding_window", True):
        return False
    return bool(window < hf.get("max_position_embeddings", 2048))


def document_prefix_id(bos_id: int | None, eos_id: int) -> int:
    """The token that preceded every document in training: BOS when the data had one, else the EOS
    that ended the previous document. HF clients' `bos_token_id` (module docstring)."""
    return eos_id if bos_id is None else bos_id


def bos_from_hf(hf: dict[str, Any]) -> int | None:
    """The checkpoint `bos_id` an HF config.json implies: its `bos_token_id`, unless that is an EOS
    id (GPT-2's convention, and our export's without BOS: documents follow the previous EOS)."""
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    return None if bos is None or bos in (eos if isinstance(eos, list) else [eos]) else bos


def client_tokenizer_json(tokenizer_json: str, bos_id: int | None) -> str:
    """`tokenizer_json` made to encode a text as training saw a document start: BOS + ids when
    training put `bos_id` before every document, else the ids alone. Post-processors that add
    tokens are replaced; others (ByteLevel's offset trimming) are kept."""
    data = json.loads(tokenizer_json)
    old = data.get("post_processor")
    kept = [p for p in _processors(old) if p["type"] not in TOKEN_ADDING_PROCESSORS]
    if bos_id is not None:
        kept.append(_bos_template(_token_text(Tokenizer.from_str(tokenizer_json), bos_id, "BOS"), bos_id))
    new = kept[0] if len(kept) == 1 else {"type": "Sequence", "processors": kept} if kept else None
    if new == old:
        return tokenizer_json
    data["post_processor"] = new
    return json.dumps(data, ensure_ascii=False)


def _processors(processor: dict[str, Any] | None) -> list[dict[str, Any]]:
    if processor is None:
        return []
    return list(processor["processors"]) if processor["type"] == "Sequence" else [processor]


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    """A `TemplateProcessing` that prepends BOS to each sequence (Llama's: `<s> $A <s> $B`)."""

    def with_bos(sequence: str, type_id: int) -> list[dict[str, Any]]:
        return [
            {"SpecialToken": {"id": bos, "type_id": type_id}},
            {"Sequence": {"id": sequence, "type_id": type_id}},
        ]

    return {
        "type": "TemplateProcessing",
        "single": with_bos("A", 0),
        "pair": with_bos("A", 0) + with_bos("B", 1),
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _token_text(tokenizer: Tokenizer, token_id: int, what: str) -> str:
    text = tokenizer.id_to_token(token_id)
    if text is None:
        raise UserError(
            f"the checkpoint's {what} id {token_id} is not in its tokenizer "
            f"({tokenizer.get_vocab_size()} tokens): its meta and tokenizer do not belong together"
        )
    return text


def to_hf_state_dict(state: Tensors, c: LlamaConfig) -> Tensors:
    """Our state dict -> HF names and layout (module docstring). Tensors are views, not copies."""
    q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out: Tensors = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(c.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split([q_size, kv_size, kv_size])
        out |= {
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.out_proj.weight"],
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
        }
        if c.is_moe:
            moe = hf + "block_sparse_moe."
            out[moe + "gate.weight"] = state[ours + "mlp.router.weight"]
            for e in range(c.n_experts):
                gate, up = state[ours + f"mlp.experts.{e}.gate_up.weight"].chunk(2)
                out |= {
                    moe + f"experts.{e}.w1.weight": gate,
                    moe + f"experts.{e}.w2.weight": state[ours + f"mlp.experts.{e}.down.weight"],
                    moe + f"experts.{e}.w3.weight": up,
                }
        else:
            gate, up = state[ours + "mlp.gate_up.weight"].chunk(2)
            out |= {
                hf + "mlp.gate_proj.weight": gate,
                hf + "mlp.up_proj.weight": up,
                hf + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
            }
    return out


def from_hf_state_dict(hf: Tensors, c: LlamaConfig) -> Tensors:
    """HF state dict (either MoE layout) -> our names and layout; a clear error on missing keys."""

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise UserError(
                f"Hugging Face weights have no tensor {key!r}: not a {hf_config(c)['architectures'][0]}?"
            )
        return hf[key]

    out: Tensors = {
        "tok_embeddings.weight": take("model.embed_tokens.weight"),
        "norm.weight": take("model.norm.weight"),
    }
    out["lm_head.weight"] = out["tok_embeddings.weight"] if c.tie_embeddings else take("lm_head.weight")
    for i in range(c.n_layers):
        ours, prefix = f"layers.{i}.", f"model.layers.{i}."
        qkv = [take(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"]
        out |= {
            ours + "attn.qkv.weight": torch.cat(qkv),
            ours + "attn.out_proj.weight": take(prefix + "self_attn.o_proj.weight"),
            ours + "attn_norm.weight": take(prefix + "input_layernorm.weight"),
            ours + "mlp_norm.weight": take(prefix + "post_attention_layernorm.weight"),
        }
        if not c.is_moe:
            gate, up = take(prefix + "mlp.gate_proj.weight"), take(prefix + "mlp.up_proj.weight")
            out[ours + "mlp.gate_up.weight"] = torch.cat([gate, up])
            out[ours + "mlp.down.weight"] = take(prefix + "mlp.down_proj.weight")
        elif prefix + "mlp.experts.gate_up_proj" in hf:  # transformers 5.x fused layout
            out[ours + "mlp.router.weight"] = take(prefix + "mlp.gate.weight")
            gate_up, down = take(prefix + "mlp.experts.gate_up_proj"), take(prefix + "mlp.experts.down_proj")
            for e in range(c.n_experts):
                out[ours + f"mlp.experts.{e}.gate_up.weight"] = gate_up[e]
                out[ours + f"mlp.experts.{e}.down.weight"] = down[e]
        else:  # per-expert layout of Hub checkpoints
            moe = prefix + "block_sparse_moe."
            out[ours + "mlp.router.weight"] = take(moe + "gate.weight")
            for e in range(c.n_experts):
                w1, w2, w3 = (take(moe + f"experts.{e}.w{n}.weight") for n in (1, 2, 3))
                out[ours + f"mlp.experts.{e}.gate_up.weight"] = torch.cat([w1, w3])
                out[ours + f"mlp.experts.{e}.down.weight"] = w2
    return out


def save_hf(
    out_dir: str | os.PathLike,
    state: Tensors,
    c: LlamaConfig,
    tokenizer_json: str | None = None,
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors (+ tokenizer.json and
    tokenizer_config.json) loadable by `from_pretrained`. `bos_id` is the checkpoint's: the BOS
    training put before every document, or None (module docstring)."""
    out_dir = Path(out_dir)
    with writing(out_dir, "OUT_DIR"):
        out_dir.mkdir(parents=True, exist_ok=True)
        return _write_hf(out_dir, state, c, tokenizer_json, bos_id, eos_id)


def _write_hf(
    out_dir: Path,
    state: Tensors,
    c: LlamaConfig,
    tokenizer_json: str | None,
    bos_id: int | None,
    eos_id: int | list[int] | None,
) -> Path:
    """Weights first and config.json last, each file atomic: a directory with config.json is whole."""
    tensors = {
        k: v.contiguous() for k, v in progress(to_hf_state_dict(state, c).items(), "converting", "tensor")
    }
    write_atomic_with(
        out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    eos = eos_id[0] if isinstance(eos_id, list) else eos_id
    prefix = bos_id if eos is None else document_prefix_id(bos_id, eos)
    pad = None
    if tokenizer_json is not None:
        pad = _write_tokenizer(out_dir, tokenizer_json, bos_id, {"bos_token": prefix, "eos_token": eos})
    special = {"bos_token_id": prefix, "eos_token_id": eos_id, "pad_token_id": eos if pad is None else pad}
    _write_json(out_dir / "generation_config.json", {k: v for k, v in special.items() if v is not None})
    dtype = str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")
    _write_json(out_dir / "config.json", hf_config(c, prefix, eos_id, pad, dtype))
    return out_dir


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _write_tokenizer(
    out_dir: Path, tokenizer_json: str, bos_id: int | None, special: dict[str, int | None]
) -> int | None:
    """tokenizer.json for clients (`client_tokenizer_json`) and tokenizer_config.json naming the
    special tokens, so `AutoTokenizer` finds BOS, EOS and PAD (EOS when the tokenizer has no pad
    token). Returns the tokenizer's own pad id."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    pad = find_pad(tokenizer)
    names = special | {"pad_token": special["eos_token"] if pad is None else pad}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    config |= {name: _token_text(tokenizer, i, name) for name, i in names.items() if i is not None}
    _write_json(out_dir / "tokenizer_config.json", config)
    write_atomic(out_dir / "tokenizer.json", client_tokenizer_json(tokenizer_json, bos_id).encode())
    return pad
