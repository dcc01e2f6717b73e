"""Bundled device profiles (YAML), shipped as package data of ``chita_edge.device_profiles``."""
