"""Benchmarks: serving load generator and KV transfer throughput."""
