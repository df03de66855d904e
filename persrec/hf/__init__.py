"""Hugging Face integration: local model directories only (loading, catalog), the item side of HLLM (item texts,
the item LLM encoder, the frozen-embedding cache) and the version differences of transformers."""
