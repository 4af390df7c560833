"""Command line: parse arguments, hand off to the library, show results.

Only this module imports click.
"""

from __future__ import annotations

import click

from gblr_compress import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gblr-compress")
def main() -> None:
    """gblr-compress: post-training GBLR compression of PyTorch models."""


if __name__ == "__main__":  # pragma: no cover
    main()
