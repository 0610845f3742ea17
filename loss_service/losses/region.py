r"""region losses (being implemented)."""

__all__: list = []
