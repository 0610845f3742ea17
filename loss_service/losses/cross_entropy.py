r"""cross_entropy losses (being implemented)."""

__all__: list = []
