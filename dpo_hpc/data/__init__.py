"""Data: HH parsing, the verifiable task, tokenization, collation and loading."""
