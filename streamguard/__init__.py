"""StreamGuard: the PatchZero defense against adversarial patches, for video."""

__version__ = "0.1.0"
