"""Preset configs shipped with the ToFu plugin (YAML files next to this module)."""
