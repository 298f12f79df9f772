"""llmcache benchmarks, by kind (bench/README.md lists them): `bench.micro` times the kernels,
`bench.costs` what the cache's own work costs, `bench.experiments` the cache on real streams."""
