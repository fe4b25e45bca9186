"""Names that users give (model ids, artifact names, dataset ids) resolved inside their own root.

Each check resolves symlinks and then tests containment, so `..`, absolute paths, encoded
separators that decode to either, and symlinks pointing out of the root all fail the same way.
"""

from __future__ import annotations

from pathlib import Path


class OutsideRoot(ValueError):
    """The name does not resolve to a path inside its root."""


def inside(root: Path, name: str) -> Path:
    """root/name resolved, refusing anything that lands outside root."""
    if not name or "\x00" in name or name.startswith(("/", "\\")) or "\\" in name:
        raise OutsideRoot(f"{name!r} is not a plain relative name")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise OutsideRoot(f"{name!r} must not contain empty, '.' or '..' parts")
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise OutsideRoot(f"{name!r} resolves outside its directory")
    return path


def resolve_model(model_id: str, models_root: Path) -> str:
    """A directory under the models root when one has that name, else the hub id unchanged."""
    try:
        local = inside(models_root, model_id)
    except OutsideRoot:
        if (models_root / model_id).exists() or (models_root / model_id).is_symlink():
            raise  # a local name that escapes the root is refused, not sent to the hub
        return model_id
    return str(local) if local.is_dir() else model_id


def job_dir(artifacts_dir: Path, job_id: str) -> Path:
    return inside(artifacts_dir, job_id)
