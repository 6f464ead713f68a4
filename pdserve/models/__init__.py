"""Llama-family model definitions, the HF checkpoint loader, and the embedded default model."""
