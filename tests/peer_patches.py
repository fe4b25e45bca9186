"""Undo what GPTQModel patches in transformers while it loads a mixture of experts.

GPTQModel 7.6.0 (through its `defuser` dependency) replaces transformers' MoE block classes
process-wide when it loads a Mixtral or Qwen MoE (`setattr` on the modeling modules and on the
checkpoint conversion mapping): every such model built afterwards in the same process has
per-expert modules with defuser's forward instead of transformers' fused experts. A test that
builds models after a GPTQModel load would then quantize defuser's modules, not transformers'.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def transformers_restored() -> Iterator[None]:
    """Put every attribute of transformers' loaded modules back as it was on entry."""
    saved = {module: dict(vars(module)) for name, module in list(sys.modules.items())
             if module is not None and (name == "transformers" or name.startswith("transformers."))}
    try:
        yield
    finally:
        for module, attributes in saved.items():
            current = vars(module)
            for key, value in attributes.items():
                if current.get(key) is not value:
                    setattr(module, key, value)
