r"""loss-service: one trusted implementation of weighted, imbalance-aware losses."""
__version__ = "0.2.0"
