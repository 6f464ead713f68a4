"""Prefill/decode disaggregation: bootstrap service, handshake and KV transfer backends."""
