r"""combo losses (being implemented)."""

__all__: list = []
