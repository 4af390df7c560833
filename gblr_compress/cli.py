"""Command line: parse arguments, hand off to the library, show results.

Only this module imports click. Errors are mapped to exit codes in one place
(:meth:`GBLRGroup.invoke`): bad input (:class:`InputError`) prints ``error: ...`` on
stderr and exits 2, click usage errors exit 2, anything else prints one
``internal error: ...`` line and exits 1; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from gblr_compress import __version__
from gblr_compress.errors import InputError

__all__ = ["DEFAULT_COMMAND", "GBLRGroup", "main", "verbose_option"]

DEFAULT_COMMAND = "compress"
_VERBOSE = "gblr_compress.verbose"


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    # ctx.meta is shared by the whole context chain, so a flag given to the group or to
    # a subcommand is seen by the error handler in the group.
    if value:
        ctx.meta[_VERBOSE] = True
    return value


def verbose_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-v/--verbose``: show tracebacks of errors. Usable on the group and any command."""
    return click.option(
        "-v",
        "--verbose",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_verbose,
        help="Show the full traceback on errors.",
    )(f)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class GBLRGroup(click.Group):
    """Click group with a default command and the one error-to-exit-code mapping.

    When a command named :data:`DEFAULT_COMMAND` is registered, a first argument that
    is not a subcommand (``gblr-compress model.pt --budget 0.3``) is routed to it, so the
    product reads as ``gblr-compress MODEL ...`` next to ``gblr-compress inspect ...``.
    Without that command the group behaves like a plain click group.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if DEFAULT_COMMAND in self.commands and args:
            group_flags = {o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
            i = 0
            while i < len(args) and args[i] in group_flags:
                i += 1
            if i < len(args) and args[i] not in self.commands:
                args = [*args[:i], DEFAULT_COMMAND, *args[i:]]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if DEFAULT_COMMAND in self.commands:
            formatter.write_usage(ctx.command_path, "[OPTIONS] MODEL [ARGS]...")
            formatter.write_usage(ctx.command_path, "[OPTIONS] COMMAND [ARGS]...", prefix="   or: ")
        else:
            super().format_usage(ctx, formatter)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors (exit 2) and explicit exits keep click's handling
        except InputError as exc:
            if ctx.meta.get(_VERBOSE):
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(2)
        except Exception as exc:
            if ctx.meta.get(_VERBOSE):
                traceback.print_exc()
            hint = "" if ctx.meta.get(_VERBOSE) else " (run with --verbose for the traceback)"
            click.echo(f"internal error: {type(exc).__name__}: {_one_line(str(exc))}{hint}", err=True)
            ctx.exit(1)


@click.group(cls=GBLRGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gblr-compress")
@verbose_option
def main() -> None:
    """gblr-compress: post-training GBLR compression of PyTorch models.

    Checkpoints saved as whole modules or bundles are pickles: loading them runs code
    from the file, so only use files you trust; a state_dict or .safetensors file with
    --factory package.module:function is the safe path.
    """


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Logs and pipes get rich's 80-column default, too narrow for the layer table.
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)
    return console


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--png", "png_dir", type=click.Path(path_type=Path), default=None,
              help="Also write one block-layout PNG per compressed layer into DIR (needs matplotlib).")
@click.option("--no-heatmap", is_flag=True, help="Only the per-layer table, no text heatmaps.")
@verbose_option
def inspect(path: Path, png_dir: Path | None, no_heatmap: bool) -> None:
    """Show the compression report in PATH (a report .json or an exported .onnx)."""
    # Lazy: rich and the report module are not needed by other commands' startup.
    from gblr_compress.report import load_report, render_inspect, write_pngs

    report = load_report(path)
    # PNGs first, so a missing matplotlib fails before any output.
    written = write_pngs(report, png_dir) if png_dir is not None else []
    console = _console()
    render_inspect(report, console, heatmaps=not no_heatmap)
    for p in written:
        console.print(f"wrote {p}")


if __name__ == "__main__":  # pragma: no cover
    main()
