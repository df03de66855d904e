"""Hugging Face integration: loading local model directories and the version differences of transformers."""
