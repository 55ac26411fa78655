"""Data: the tokenizer, the token shard format and the exact training order over the shards.

The reading path, what training needs (numpy and torch only, never `datasets`):
- `shards`: the on-disk format (flat token files, sidecars, one manifest per dataset);
- `tokens`: one split of a dataset as a memory-mapped token stream, read in windows;
- `permutation`, `mixture`, `ramp`, `skips`, `order`: global sample index -> (source, window);
- `loader`: training micro-batches and validation batches (`build_train_dataset`,
  `build_val_datasets`, `data_fingerprint`);
- `verify`: a dataset checked against its manifest (tokenizer, checksums, token ids);
- `tokenizer`: train, load and fingerprint tokenizers.

The offline side, raw text -> token shards, is `pretrain.data.prepare` (it may import `datasets`).
"""
