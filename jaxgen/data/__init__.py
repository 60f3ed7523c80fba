"""Data sources, tokenizer and the batch pipeline."""
