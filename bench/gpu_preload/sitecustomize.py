"""A worker environment where every Python process touches CUDA at start (bench/gpu.sh's
poisoned service run): put this folder first on PYTHONPATH of `gptqd up`.

On a CUDA machine it imports torchao when importable (seen initialising CUDA through
transformers' imports) and calls torch.cuda.init(): a process that did so breaks every child
it forks. Without CUDA it imports tests/forkpoison's fork_poison (that folder must be on
PYTHONPATH too), which breaks forked children the same way. One line per process on stderr
says which was done, so the check can tell the poison was in place. Python imports only the
first sitecustomize on the path: the ones after this folder's (a simulated card's, in
bench/gpu.sh --simulate) are run next, in path order.
"""

import os
import runpy
import sys
from pathlib import Path


def _poison() -> str:
    done = []
    try:
        import torchao  # noqa: F401

        done.append("torchao imported")
    except Exception as exc:  # absent, or broken by a mismatched torch: either way not used
        done.append(f"no torchao ({type(exc).__name__})")
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
        done.append("torch.cuda.init() done")
    else:
        import fork_poison  # noqa: F401

        done.append("no CUDA: fork_poison imported")
    return ", ".join(done)


sys.stderr.write(f"gpu_preload[{os.getpid()}]: {_poison()}\n")


def _run_shadowed() -> None:
    """The sitecustomize modules this one shadows, in path order."""
    seen = {Path(__file__).resolve()}
    for entry in list(sys.path):  # a copy: the modules run may add to the path
        other = Path(entry or ".").resolve() / "sitecustomize.py"
        if other not in seen and other.is_file():
            seen.add(other)
            runpy.run_path(str(other), run_name="sitecustomize")


_run_shadowed()
