"""The model repository (see repository.py); its errors and states for the routes."""

from surge.server.repository.deployments import (
    AnyDeployment,
    Deployment,
    EngineFactory,
    ModelLoadError,
    TensorDeployment,
)
from surge.server.repository.repository import ModelRepository
from surge.server.repository.scanning import CONFIG_FILE, directory_signature, read_settings
from surge.server.repository.versions import (
    ModelRequiredError,
    ModelUnavailableError,
    RepositoryConflictError,
    State,
    VersionRecord,
)

__all__ = ["CONFIG_FILE", "AnyDeployment", "Deployment", "TensorDeployment", "EngineFactory", "ModelLoadError", "ModelRepository", "ModelRequiredError",
           "ModelUnavailableError", "RepositoryConflictError", "State", "VersionRecord", "directory_signature",
           "read_settings"]
