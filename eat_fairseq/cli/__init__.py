"""Console entry points (installed by setup.py)."""
