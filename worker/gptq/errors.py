"""Engine errors a person can act on. Each has a stable code the service stores with a failed job."""

from __future__ import annotations


class EngineError(Exception):
    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(EngineError):
    code = "model_not_found"


class ModelAccessDenied(EngineError):
    code = "model_access_denied"


class UnsupportedArchitecture(EngineError):
    code = "unsupported_architecture"


class LayerShapeError(EngineError):
    code = "layer_shape"


class UnmatchedRule(EngineError):
    """A `dynamic` rule that decides none of the model's layers: a typo, or another family's names."""

    code = "unmatched_rule"


class CalibrationError(EngineError):
    code = "calibration"


class CholeskyError(EngineError):
    code = "cholesky_failed"


class OutOfMemory(EngineError):
    code = "out_of_memory"


class DiskFull(EngineError):
    code = "disk_full"


class InvalidCheckpoint(EngineError):
    code = "invalid_checkpoint"


# publishing a checkpoint to the hub (hubupload.py)
class HubAuthFailed(EngineError):
    code = "hub_auth_failed"


class HubAccessDenied(EngineError):
    code = "hub_access_denied"


class HubUnreachable(EngineError):
    code = "hub_unreachable"


class UploadFailed(EngineError):
    code = "upload_failed"
