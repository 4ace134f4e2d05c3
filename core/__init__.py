"""Shared core: the typed feature config, feature keys, the category tree, storage and clean rows."""
