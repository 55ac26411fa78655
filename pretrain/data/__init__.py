"""Data: tokenizer, raw text -> token shards, and the exact training order over them.

Preparation (`tokenizer`, `inputs`, `settings`, `prepare`, `cli`) may import `datasets`
(lazily); the training-time reading path (`shards` format, `tokens` stream, `permutation`,
`mixture`, `order`, `loader`) needs only numpy and torch. The trainer's entry points are
`pretrain.data.loader.build_train_dataset`, `build_val_datasets` and `data_fingerprint`.
"""
