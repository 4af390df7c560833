"""CLI machinery: default-command routing and the exit codes 0 / 2 / 1."""

from __future__ import annotations

import click
from click.testing import CliRunner

from gblr_compress.cli import GBLRGroup, main, verbose_option
from gblr_compress.errors import InputError


def _group(with_default: bool) -> click.Group:
    @click.group(cls=GBLRGroup)
    @verbose_option
    def app() -> None:
        """Test app."""

    @app.command()
    @click.argument("what")
    @verbose_option
    def boom(what: str) -> None:
        if what == "input":
            raise InputError("budget must be in (0, 1], got 3")
        if what == "bug":
            raise KeyError("oops\nsecond line")
        click.echo("fine")

    if with_default:

        @app.command("compress")
        @click.argument("model")
        @click.option("--budget", type=float, required=True)
        def compress(model: str, budget: float) -> None:
            click.echo(f"compress {model} {budget}")

    return app


def test_default_command_routing() -> None:
    runner = CliRunner()
    app = _group(with_default=True)
    res = runner.invoke(app, ["model.pt", "--budget", "0.3"])
    assert res.exit_code == 0 and res.output.strip() == "compress model.pt 0.3"
    res = runner.invoke(app, ["--verbose", "model.pt", "--budget", "0.5"])
    assert res.exit_code == 0 and res.output.strip() == "compress model.pt 0.5"
    res = runner.invoke(app, ["--budget", "0.2", "m.pt"])
    assert res.exit_code == 0 and res.output.strip() == "compress m.pt 0.2"
    res = runner.invoke(app, ["boom", "ok"])
    assert res.exit_code == 0 and res.output.strip() == "fine"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "MODEL [ARGS]" in res.output
    # Without a registered compress command an unknown name is a plain usage error.
    res = runner.invoke(_group(with_default=False), ["model.pt"])
    assert res.exit_code == 2 and "No such command" in res.output


def test_exit_codes_and_one_line_messages() -> None:
    runner = CliRunner()
    app = _group(with_default=False)
    res = runner.invoke(app, ["boom", "input"])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: budget must be in (0, 1], got 3"
    res = runner.invoke(app, ["boom", "bug"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: KeyError:")
    assert "Traceback" not in res.stderr
    res = runner.invoke(app, ["boom", "bug", "--verbose"])
    assert res.exit_code == 1 and "Traceback" in res.stderr and "internal error" in res.stderr
    res = runner.invoke(app, ["--verbose", "boom", "input"])
    assert res.exit_code == 2 and "Traceback" in res.stderr
    res = runner.invoke(app, ["boom"])  # missing argument: click usage error
    assert res.exit_code == 2


def test_main_group_help() -> None:
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "--verbose" in res.output and "trust" in res.output


def test_vocab_share_default_is_the_jobs() -> None:
    # The CLI imports the job lazily (a fast --help), so its default is a literal: keep
    # it the library's.
    from gblr_compress.cli import compress_cmd
    from gblr_compress.job import VOCAB_SHARE

    option = next(p for p in compress_cmd.params if p.name == "vocab_share")
    assert option.default == VOCAB_SHARE
