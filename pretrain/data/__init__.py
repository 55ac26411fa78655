"""Data: tokenizer, raw text -> token shards (`prepare`), and the exact training order over them.

Preparation (`tokenizer`, `inputs`, `prepare`) may import `datasets`; the training-time
reading path (`shards`, `tokens`, `permutation`, `mixture`, `order`, `loader`) needs only
numpy and torch. The trainer's entry points are in `pretrain.data.loader`.
"""
