"""Validation of bundles against the PyTorch reference with Polygraphy as the comparison engine
(rules: docs/validation.md)."""
