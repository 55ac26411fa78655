"""`pretrain generate`: the KV cache matches full recomputation, batching with left padding matches
one prompt at a time, greedy output matches `transformers` `generate`, sampling filters, EOS
stopping, and proxy tuning (expert == base is the large model; an offset shifts as computed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import require
from tokenizers import Tokenizer

from pretrain.cli import main
from pretrain.data.tokenizer import train_bpe
from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import ModelCheckpoint, save_model_checkpoint
from pretrain.model.generate import Sampling, combine_logits, generate, load_generation_model, next_tokens
from pretrain.model.hf import save_hf
from pretrain.model.llama import KVCache

CONFIG = LlamaConfig(
    vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128, max_seq_len=64
)
GREEDY = Sampling(temperature=0)
PROMPTS = [[5, 17, 300, 42, 9, 77, 8], [100, 3], [250, 251, 252, 253]]


def random_model(seed: int, config: LlamaConfig = CONFIG) -> Llama:
    torch.manual_seed(seed)
    return Llama(config).eval()


def greedy_without_cache(logits_of, prompt: list[int], new_tokens: int) -> list[int]:
    """Reference decoding: recompute the whole sequence for every new token."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            sequence.append(int(logits_of(torch.tensor([sequence])).argmax()))
    return sequence[len(prompt) :]


def last_logits(model: Llama):
    return lambda tokens: model(tokens).logits[0, -1]


@pytest.fixture(scope="module")
def saved_model(tiny_dataset, tmp_path_factory) -> Path:
    """A random model saved with the tiny dataset's real tokenizer (EOS id 0)."""
    path = tmp_path_factory.mktemp("generate") / "model.pt"
    tokenizer_json = (tiny_dataset / "tokenizer.json").read_text()
    checkpoint = ModelCheckpoint(
        CONFIG, random_model(0).state_dict(), tokenizer_json, {"eos_id": 0, "bos_id": 1}
    )
    return save_model_checkpoint(path, checkpoint)


def test_kv_cache_logits_equal_full_forward_in_chunks_and_with_left_padding():
    model = random_model(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache(CONFIG, 2, 24)
        chunks = [
            model(tokens[:, a:b], cache=cache).logits
            for a, b in [(0, 7), (7, 12), *((i, i + 1) for i in range(12, 20))]
        ]
        assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5
        padded = torch.cat([torch.full((2, 3), 7), tokens], dim=1)  # 3 padding slots per row
        cache = KVCache(CONFIG, 2, 24, pad=torch.tensor([3, 3]))
        assert (model(padded, cache=cache).logits[:, 3:] - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="KV cache is full"):
        model(tokens[:, :5], cache=cache)


def test_greedy_with_kv_cache_equals_recomputing_without_it():
    model = random_model(0)
    for prompt in PROMPTS:
        ours = generate([(model, 1.0)], [prompt], 24, GREEDY, eos_ids=set())[0]
        assert ours == greedy_without_cache(last_logits(model), prompt, 24)


def test_batched_left_padded_prompts_decode_as_each_alone():
    model = random_model(0)
    batched = generate([(model, 1.0)], PROMPTS, 20, GREEDY, eos_ids=set())
    assert batched == [generate([(model, 1.0)], [p], 20, GREEDY, eos_ids=set())[0] for p in PROMPTS]
    assert len({tuple(row) for row in batched}) == len(PROMPTS)


def test_each_row_stops_at_eos_and_too_long_is_refused():
    model = random_model(0)
    free = generate([(model, 1.0)], PROMPTS[:2], 12, GREEDY, eos_ids=set())
    eos = free[0][3]  # the 4th token row 0 produces becomes "EOS"
    stopped = generate([(model, 1.0)], PROMPTS[:2], 12, GREEDY, eos_ids={eos})
    assert stopped[0] == free[0][:4]
    assert eos not in free[1] and stopped[1] == free[1]  # the other row runs on

    with pytest.raises(UserError, match="exceeds the model's context of 64 tokens"):
        generate([(model, 1.0)], PROMPTS, 60, GREEDY, eos_ids=set())


def test_sampling_filters_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)

    def draws(sampling: Sampling, seed: int = 0) -> torch.Tensor:
        return next_tokens(logits, sampling, torch.Generator().manual_seed(seed))

    assert set(draws(Sampling(1.0)).tolist()) == {0, 1, 2, 3}
    assert set(draws(Sampling(1.0, top_k=2)).tolist()) == {0, 1}
    assert set(draws(Sampling(1.0, top_p=0.7)).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(Sampling(1.0, top_p=0.5)).tolist()) == {0}
    assert set(draws(Sampling(1.0, top_k=1)).tolist()) == {0}
    assert (draws(Sampling(0)) == 0).all()
    assert abs((draws(Sampling(1.0)) == 0).float().mean() - 0.5) < 0.05
    assert torch.equal(draws(Sampling(0.7), seed=3), draws(Sampling(0.7), seed=3))


def test_greedy_output_matches_transformers_generate(saved_model, tmp_path):
    transformers = require("transformers")
    loaded = load_generation_model(saved_model)
    save_hf(tmp_path, loaded.model.state_dict(), CONFIG, eos_id=0, bos_id=1)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = generate([(loaded.model, 1.0)], PROMPTS, 16, GREEDY, eos_ids={0})
    longest = max(len(p) for p in PROMPTS)
    input_ids = torch.tensor([[2] * (longest - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=0,
            pad_token_id=2,
        )
    for row, tokens in enumerate(ours):
        assert out[row, longest : longest + len(tokens)].tolist() == tokens


def test_proxy_tuning_with_expert_equal_to_base_is_the_large_model():
    large, small = random_model(0), random_model(1, CONFIG.replace(dim=32, n_heads=2, n_kv_heads=1))
    alone = generate([(large, 1.0)], PROMPTS, 16, GREEDY, eos_ids=set())
    proxied = generate([(large, 1.0), (small, 1.5), (small, -1.5)], PROMPTS, 16, GREEDY, eos_ids=set())
    assert proxied == alone
    large_logits, small_logits = torch.randn(4, 101), torch.randn(4, 101)  # exactly, not by luck of ties
    assert torch.equal(
        combine_logits([1.0, 1.5, -1.5], [large_logits, small_logits, small_logits]), large_logits
    )


def test_proxy_tuning_with_a_logit_offset_shifts_the_output_as_computed():
    large = random_model(0)
    small_config = CONFIG.replace(dim=32, n_heads=2, n_kv_heads=1)
    base, expert = random_model(1, small_config), random_model(1, small_config)
    with torch.no_grad():  # the expert's logits = the base's + 3 * (its hidden state) . delta
        expert.lm_head.weight += 3 * torch.randn_like(expert.lm_head.weight)
    alpha = 0.5
    proxied = generate([(large, 1.0), (expert, alpha), (base, -alpha)], PROMPTS, 16, GREEDY, eos_ids=set())

    def combined(tokens: torch.Tensor) -> torch.Tensor:
        return large(tokens).logits[0, -1] + alpha * (
            expert(tokens).logits[0, -1] - base(tokens).logits[0, -1]
        )

    for prompt, tokens in zip(PROMPTS, proxied):
        assert tokens == greedy_without_cache(combined, prompt, 16)
    assert proxied != generate([(large, 1.0)], PROMPTS, 16, GREEDY, eos_ids=set())


def test_generate_cli_from_checkpoint_and_hf_dir_and_proxy_tokenizer_check(saved_model, tmp_path, capsys):
    args = ["--prompt", "def main():", "--prompt", "import os", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", str(saved_model), *args]) == 0
    from_checkpoint = capsys.readouterr().out
    assert (
        from_checkpoint.startswith("--- [0] ---\ndef main():") and "--- [1] ---\nimport os" in from_checkpoint
    )

    assert main(["export-hf", str(saved_model), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out == from_checkpoint

    proxy = ["--proxy-expert", str(saved_model), "--proxy-base", str(tmp_path / "hf")]
    assert main(["generate", str(saved_model), *args, *proxy, "--proxy-alpha", "2"]) == 0
    assert capsys.readouterr().out == from_checkpoint  # expert == base

    other = train_bpe(["completely different text " * 50], 300)
    assert Tokenizer.from_str(other.to_str()).get_vocab_size() < 512
    other_model = tmp_path / "other.pt"
    save_model_checkpoint(
        other_model, ModelCheckpoint(CONFIG, random_model(2).state_dict(), other.to_str(), {})
    )
    assert (
        main(
            [
                "generate",
                str(saved_model),
                *args,
                "--proxy-expert",
                str(other_model),
                "--proxy-base",
                str(saved_model),
            ]
        )
        == 2
    )
    assert "proxy tuning needs one shared tokenizer" in capsys.readouterr().err
    assert main(["generate", str(saved_model), *args, "--proxy-expert", str(saved_model)]) == 2
    assert "needs both --proxy-expert and --proxy-base" in capsys.readouterr().err


def test_sampled_generation_is_reproducible_by_seed(saved_model, capsys):
    args = [
        "generate",
        str(saved_model),
        "--prompt",
        "",
        "--max-new-tokens",
        "10",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
    ]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
