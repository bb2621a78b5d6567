"""Mixed precision: bits per quantization point under a budget, and an accuracy target.

- budget.py: what `--avg-bits` / `--size-mb` count, and each point's footprint;
- tables.py: each point's sensitivity at each candidate width (the method calibrated per width);
- allocate.py: three criteria (Fisher knapsack, MPTQ-ViT-style greedy, LRP-QViT-style relevance);
- target.py: `--max-drop`, the fewest raises that keep a held-out accuracy drop within a target;
- cli.py: the `vitquant quantize` flags.
The result of each is a QuantConfig whose per-point plan (exact names in site_bits / keep_float, see
vitquant.plan) every method calibrates with.
"""
