"""Dagster assets, one module per dataset version; each builds its assets from the config."""
