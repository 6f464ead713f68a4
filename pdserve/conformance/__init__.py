"""``pdserve conformance``: the DP-rank contract of a P/D router, checked case by case on a sim fleet."""
