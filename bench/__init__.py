"""llmcache benchmarks: `python -m bench.kernels` times the kernels against baselines and hardware floors."""
