"""Microbenchmarks: the kernels against baselines and hardware floors (`python -m bench.micro.kernels`)."""
