"""The inference engine: paged KV pool, continuous-batching scheduler, sampler, offline API."""
