"""Downstream evaluation through lm-evaluation-harness (the optional extra `pretrain[eval]`).

`backend` is the lm-eval model `pretrain` (our Llama, any checkpoint form), `harness` names,
loads and scores tasks (suites, the embedded pystdlib task, offline failures), `runs` evaluates
one checkpoint or a run's checkpoints, `metrics` tells scores from other columns, and
`lm_eval_plugin` registers the backend with lm-eval at start-up. Nothing here is imported by
training unless the `DownstreamEval` callback is configured.
"""
