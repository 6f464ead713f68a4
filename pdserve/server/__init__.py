"""HTTP serving: front process (FastAPI), DP controller and one worker process per DP rank."""
