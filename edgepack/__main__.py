"""``python -m edgepack`` runs the CLI."""

from edgepack.cli import main

main()
