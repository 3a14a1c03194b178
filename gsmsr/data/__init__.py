"""Data helpers that BasicSR lacks."""
