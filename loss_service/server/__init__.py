r"""The gRPC ``loss_service.v1.LossService`` server (see docs/service.md).

``python -m loss_service serve`` runs it; ``create_server(address, config)`` and
:class:`BackgroundServer` embed it.

The names below are imported on first use: ``loss-service serve --help`` (:mod:`.command`) and
the settings (:mod:`.config`) must not load torch, which the server's modules need.
"""
import importlib
from typing import Any

# Exported name -> the module of this package that defines it.
_EXPORTS = {
    "SERVICE_NAME": "loss_service.protocol",
    "BackgroundServer": ".app",
    "LossServer": ".app",
    "create_server": ".app",
    "serve": ".app",
    "ConfigError": "loss_service.protocol",
    "ServerConfig": ".config",
    "select_device": ".config",
    "tune_malloc": ".memory",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
