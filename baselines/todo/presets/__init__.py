"""Preset configs shipped with the ToDo plugin (YAML files next to this module)."""
