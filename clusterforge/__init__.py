"""clusterforge: one inventory to a self-assembling bare-metal cluster."""

__version__ = "0.1.0"
