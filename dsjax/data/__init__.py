"""DATA_PREP: download, tokenizer, token cache and the Grain pipeline."""
