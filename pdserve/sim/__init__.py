"""Simulated compute: the real pdserve stack with the forward pass replaced by a clock.

A sim server (``pdserve serve --simulate HARDWARE|profile:FILE``) runs the real front, DP
controller, scheduler, KV page accounting and P/D protocol; only the model forward is replaced by
a cost model (:mod:`.cost_model`) that returns a step's duration, which the rank then waits out
in wall-clock time. See docs/simulation.md.
"""
