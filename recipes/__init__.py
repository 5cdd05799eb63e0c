"""Wiring only: the ``argrpo`` CLI and the shipped YAML configs. Library code never imports this package."""
