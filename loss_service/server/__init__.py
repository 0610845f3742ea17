r"""The gRPC ``loss_service.v1.LossService`` server (see docs/service.md).

``python -m loss_service serve`` runs it; ``create_server(address, config)`` and
:class:`BackgroundServer` embed it.
"""
from .app import SERVICE_NAME, BackgroundServer, LossServer, create_server, serve
from .config import ConfigError, ServerConfig, select_device
from .memory import tune_malloc

__all__ = [
    "SERVICE_NAME",
    "BackgroundServer",
    "ConfigError",
    "LossServer",
    "ServerConfig",
    "create_server",
    "select_device",
    "serve",
    "tune_malloc",
]
