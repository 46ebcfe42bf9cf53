"""Proxy models: small SDXL-shaped and Flux-shaped models trained on photographs, their data,
training command, weight files and feature extractor."""
