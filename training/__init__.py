"""The Self-Forcing training package (imports :mod:`sf_sdk`, never the reverse)."""
