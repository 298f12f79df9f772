"""Triton kernels for llmcache ops (portable popcount: they also run under TRITON_INTERPRET=1)."""
