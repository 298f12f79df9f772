"""Experiments: the cache on query streams end to end, prefix reuse, the semantic tier on held-out
text, the paper's experiments and the shared tier on Redis (`python -m bench.experiments.<name>`)."""
