r"""focal losses (being implemented)."""

__all__: list = []
