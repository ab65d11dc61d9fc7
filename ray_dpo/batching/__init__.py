"""Batches and log-probs: how tokenized pairs become model rows, and how the logits of
those rows become summed response log-probs. Pure torch: imports neither ray, deepspeed,
vllm nor transformers.

    padded   the right-padded chosen+rejected batch (concat_pairs, split_pairs), the pair
             check every layout runs first, TokenCounts
    logps    token_logps, the one chunked log-softmax; sequence_logps; mean_nll
    layouts  build_batch -> model_inputs -> pair_logps for padded / packed / prefix_shared
             (docs/architecture.md, "Batch layouts")
    budget   token-budget micro-batches and the cost model behind them
    probe    the weight-sync probe's padded rows and their log-probs under a causal LM
"""
