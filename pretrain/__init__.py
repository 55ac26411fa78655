"""pretrain: pretrain and continually pretrain small Llama-architecture language models."""

__version__ = "0.1.0"
