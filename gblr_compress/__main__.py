"""``python -m gblr_compress`` runs the CLI (same as the ``gblr-compress`` script)."""

from gblr_compress.cli import main

main()
