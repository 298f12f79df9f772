"""What the cache's own work costs: bookkeeping per forward, the state check, the host path, memory,
the per-block lock under threads, and torch.compile with the cache (`python -m bench.costs.<name>`)."""
