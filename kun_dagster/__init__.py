"""kun-dagster: the Kun instruction-data method as a declarative Dagster project.

The modules of this package are the domain core and import no Dagster, except definitions.py
and cli.py, which compose the Dagster layer (assets/, resources/, checks/).
"""

__version__ = "0.1.0"
