"""A stored job spec (the API's JobIn as JSON) turned into the engine's arguments."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from app.paths import inside, resolve_model
from app.settings import Settings
from app.store import Store
from worker.gptq.config import BUILTIN, BUILTIN_HELDOUT, CalibrationSpec, QuantizeConfig
from worker.gptq.errors import CalibrationError, ModelNotFound

QUANT_FIELDS = ("bits", "group_size", "damp_percent", "desc_act", "sym", "static_groups",
                "true_sequential", "act_group_aware", "mse", "tensor_names")


def quantize_config(spec: dict[str, Any]) -> QuantizeConfig:
    # a spec stored before a field existed runs with the engine's default for it
    fields = {k: spec[k] for k in QUANT_FIELDS if k in spec}
    if spec.get("dynamic"):
        # a rule's unset settings (stored as null) are the job's own
        fields["dynamic"] = {key: {k: v for k, v in settings.items() if v is not None}
                             for key, settings in spec["dynamic"].items()}
    return QuantizeConfig(**fields)


def dataset_file(store: Store, settings: Settings, dataset_id: str) -> Path:
    ds = store.get_dataset(dataset_id)
    if ds is None:
        raise CalibrationError(f"dataset {dataset_id} no longer exists")
    return inside(settings.datasets_dir, f"{ds.id}.{ds.format}")


def calibration_source(calib: dict[str, Any], store: Store, settings: Settings) -> str:
    """"builtin", an uploaded file's path, or a hub dataset "NAME:CONFIG:SPLIT"."""
    if calib.get("dataset_id"):
        return str(dataset_file(store, settings, calib["dataset_id"]))
    if calib["dataset"] == BUILTIN:
        return BUILTIN
    return ":".join([calib["dataset"], calib.get("config") or "", calib["split"]])


def calibration_spec(spec: dict[str, Any], store: Store, settings: Settings) -> CalibrationSpec:
    calib = spec["calibration"]
    return CalibrationSpec(
        source=calibration_source(calib, store, settings),
        text_field=calib["text_field"],
        num_samples=calib["num_samples"],
        seq_length=calib["seq_length"],
        seed=calib["seed"],
    )


def eval_source(
    spec: dict[str, Any], dataset_id: str | None, store: Store, settings: Settings
) -> tuple[str, str]:
    """(source, text_field) of the text perplexity is measured on.

    An explicit dataset_id wins; a hub calibration set is evaluated on its "test" split and
    builtin calibration text on the builtin part held out from calibration; an uploaded
    calibration file, having no held-out part, on that same text (results say "held_out").
    """
    calib = spec["calibration"]
    if dataset_id:
        return str(dataset_file(store, settings, dataset_id)), "text"
    if calib.get("dataset_id"):
        return calibration_source(calib, store, settings), calib["text_field"]
    if calib["dataset"] == BUILTIN:
        return BUILTIN_HELDOUT, calib["text_field"]
    return ":".join([calib["dataset"], calib.get("config") or "", "test"]), calib["text_field"]


def held_out(eval_text: str, spec: dict[str, Any], store: Store, settings: Settings) -> bool:
    """Whether the eval text is other text than the job calibrated on."""
    return eval_text != calibration_source(spec["calibration"], store, settings)


def eval_seq_length(spec: dict[str, Any], requested: int | None) -> int:
    return requested or spec["calibration"]["seq_length"]


def local_models_hint(model_id: str, settings: Settings) -> str:
    """For a model id that was looked up on the hub and not found: the local directories the
    server has, the closest first (a mistyped local name is the likelier mistake)."""
    root = settings.models_root
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    where = "the server's models directory (GPTQD_MODELS_DIR)"
    if not names:
        return f"; {where} holds no model either"
    close = difflib.get_close_matches(model_id, names, n=3, cutoff=0.5)
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"; {guess}{where} holds: {shown}"


def model_source(spec: dict[str, Any], settings: Settings) -> str:
    """The model's directory when it was local at submission (it must still be), else the
    hub id (or a directory that appeared since)."""
    if spec.get("model_source") == "local":
        path = inside(settings.models_root, spec["model_id"])
        if not path.is_dir():
            raise ModelNotFound(
                f"model directory {spec['model_id']!r} is no longer in the server's models "
                "directory (removed after the job was submitted); put it back and submit again"
            )
        return str(path)
    return resolve_model(spec["model_id"], settings.models_root)
