"""External scheduler that places each request's prefill and decode halves independently."""
