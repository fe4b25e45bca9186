"""gptqd service: API, job store, settings and the `gptqd` command."""
