"""The shipped checkpoints and ``manifest.json``, installed as package data (``streamguard.weights``).

The files are read through :mod:`importlib.resources` (see :mod:`streamguard.checkpoints`); this
module only makes the folder a package.
"""
