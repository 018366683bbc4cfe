"""The engine's version (in drmerge.json and ``drmerge --version``): its own module so that
the modules that write it need not import the package ``drmerge`` (no import cycle)."""

__version__ = "0.1.0"
