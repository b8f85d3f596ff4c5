"""Data preparation: manifest writers and checkers (library functions; CLIs in ``manifests/``)."""
