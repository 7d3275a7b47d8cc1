"""Data: a locally trained tokenizer, tiny models built from config, synthetic tasks, prompt loading."""
