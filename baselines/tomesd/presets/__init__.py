"""Preset configs shipped with the ToMeSD plugin (YAML files next to this module)."""
