"""``python -m streamguard`` runs the CLI."""

from .cli import main

main()
