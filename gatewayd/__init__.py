"""gatewayd: a gym hub's wearables -> per-second samples, served as Terra's streaming protocol."""

__version__ = "0.1.0"
