"""Put this folder on PYTHONPATH and every Python process runs as on a one-GPU machine: the
simulated card of tests/simcuda.py, entered at start and held for the process's life (the
worker's device probe, its job processes, the API)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: tests.simcuda

from tests.simcuda import hold_simulated_cuda

hold_simulated_cuda()
