"""The names of the KV transfer backends: a torch-free leaf shared by the servers' P/D options
(``pdserve.disagg.config``) and ``pdserve launch``, which reaches the servers over HTTP only."""

BACKENDS = ("tcp", "shm", "nixl", "mooncake")  # one module each under pdserve.disagg.transfer (they move KV bytes)
SIM_BACKEND = "sim"  # --simulate only: protocol frames, no bytes (pdserve.sim.transfer)
ALL_BACKENDS = (*BACKENDS, SIM_BACKEND)
