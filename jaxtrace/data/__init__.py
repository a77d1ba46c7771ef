"""Data: tasks, prompt templates, tokenizers, and jsonl readers."""
