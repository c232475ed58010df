"""SOSP Lab engine: second-order structured pruning (SOSP-I / SOSP-H) and bottleneck analysis, no UI inside."""
__version__ = "0.1.0"
