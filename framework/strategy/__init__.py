"""Strategies: the YAML's validation, the plugin registry, and the composer that fuses kernels."""
