"""The shipped recipes (``NAME.toml``), installed as package data (``streamguard.pipelines``).

The files are read through :mod:`importlib.resources` (see :mod:`streamguard.recipes`); this
module only makes the folder a package.
"""
