"""Is the device that GPTQD_DEVICE names usable on this machine? Asked once, at worker start.

The probe runs in a fresh process: asking CUDA in the worker's own process would initialise it
there, and the worker's processes must stay free of CUDA (see worker/jobprocess.py).
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, torch
d = torch.device(sys.argv[1])
x = torch.ones(8, device=d)
assert float((x + x).sum()) == 16.0
print(torch.cuda.get_device_name(d) if d.type == "cuda" else d.type)
"""
PROBE_SECONDS = 180.0  # a first CUDA start on a big box can take a while


def device_problem(device: str | None, timeout: float = PROBE_SECONDS) -> str | None:
    """Why jobs cannot run on `device`, in words a person acts on; None when it works or when
    nothing was asked for (None: each job picks CUDA when present, else the CPU)."""
    if device in (None, "", "cpu"):
        return None
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, device], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        why = f"a test computation on it did not finish in {timeout:.0f} s"
    else:
        if done.returncode == 0:
            return None
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"the probe exited with code {done.returncode}"
    return (
        f"GPTQD_DEVICE={device}, but that device does not work on this machine ({why}). "
        "Check the GPU driver (nvidia-smi), CUDA_VISIBLE_DEVICES, and that torch is a CUDA "
        "build (python -c 'import torch; print(torch.version.cuda)'); or unset GPTQD_DEVICE "
        "to run jobs on the CPU."
    )
