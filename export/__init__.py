r"""``python -m export`` in a checkout of the repository runs the exporter, :mod:`loss_service.export`
(installed: ``python -m loss_service.export`` or ``loss-service-export``). Not part of the wheel."""
