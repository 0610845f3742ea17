r"""regression losses (being implemented)."""

__all__: list = []
