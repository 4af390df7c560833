"""Command line: parse arguments, hand off to the library, show results.

Only this module imports click. Errors are mapped to exit codes in one place
(:meth:`GBLRGroup.invoke`): bad input (:class:`InputError`) prints ``error: ...`` on
stderr and exits 2, click usage errors exit 2, a result not good enough to write
(:class:`FidelityError`: ONNX parity, the fidelity gate) exits 3, SIGINT / SIGTERM
exit 130 / 143 after the same cleanup as an error, anything else prints one
``internal error: ...`` line and exits 1; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from gblr_compress import __version__
from gblr_compress.errors import FidelityError, InputError
from gblr_compress.signals import Terminated, exit_code, interrupt_in, terminate_as_exception

__all__ = ["DEFAULT_COMMAND", "GBLRGroup", "main", "verbose_option"]

DEFAULT_COMMAND = "compress"
_VERBOSE = "gblr_compress.verbose"
_WRITTEN = "gblr_compress.written"


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

    @staticmethod
    def _interrupted(ctx: click.Context, exc: BaseException) -> None:
        """One line and exit 130 (SIGINT) / 143 (SIGTERM); the outputs were either never
        written or removed by the cleanup the interrupt unwound through, unless the run
        had finished writing them (then they are complete)."""
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        done = "the outputs were already written and are complete" if ctx.meta.get(_WRITTEN) else "nothing written"
        click.echo(f"interrupted ({name}): {done}", err=True)
        ctx.exit(exit_code(exc))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with terminate_as_exception():  # SIGTERM unwinds like SIGINT: finally blocks clean up
                return super().invoke(ctx)
        except (KeyboardInterrupt, Terminated) as exc:
            self._interrupted(ctx, exc)
        except click.exceptions.UsageError as exc:
            # A bad option value is bad input like any other: one line, exit 2.
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            ctx.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors (exit 2) and explicit exits keep click's handling
        except InputError as exc:
            interrupt = interrupt_in(exc)
            if interrupt is not None:  # a loader's one-line error around an interrupted import
                self._interrupted(ctx, interrupt)
            if ctx.meta.get(_VERBOSE):
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(2)
        except FidelityError as exc:
            if ctx.meta.get(_VERBOSE):
                traceback.print_exc()
            hint = " (--force writes it anyway)" if exc.forceable else ""
            click.echo(f"error: {_one_line(str(exc))}{hint}", err=True)
            ctx.exit(3)
        except Exception as exc:
            interrupt = interrupt_in(exc)
            if interrupt is not None:  # e.g. an ImportError raised by an interrupted import
                self._interrupted(ctx, interrupt)
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
    from gblr_compress.memory import tune_allocator

    tune_allocator()  # before the first large tensor (see its docstring)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr)
    # Logs and pipes get rich's 80-column default, too narrow for the layer table.
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120, stderr=stderr)
    return console


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--png", "png_dir", type=click.Path(path_type=Path), default=None,
              help="Also write one block-layout PNG per compressed layer into DIR, and pareto.png (fidelity vs "
                   "measured speedup) when the report has candidates (needs matplotlib: the 'plot' extra).")
@click.option("--no-heatmap", is_flag=True, help="Only the per-layer table, no text heatmaps.")
@verbose_option
def inspect(path: Path, png_dir: Path | None, no_heatmap: bool) -> None:
    """Show the compression report in PATH (a report .json or an exported .onnx)."""
    # Lazy: rich and the report module are not needed by other commands' startup.
    from gblr_compress.report import PLOT_HINT, load_report, render_inspect, write_pngs

    report = load_report(path)
    # PNGs first, so a missing matplotlib fails before any output.
    written = write_pngs(report, png_dir) if png_dir is not None else []
    console = _console()
    render_inspect(report, console, heatmaps=not no_heatmap)
    for p in written:
        console.print(f"wrote {p}")
    if report.candidates and png_dir is None:
        console.print(f"Pareto picture of the candidates: add --png DIR (needs {PLOT_HINT})", markup=False)



def _budget(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        b = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None
    return b  # the range is CompressConfig's to check (its error names the flag here)


class _Bars:
    """rich progress bars on a terminal; one line per finished phase elsewhere (CI logs)."""

    def __init__(self, console: Any, quiet: bool) -> None:
        self.console, self.quiet = console, quiet
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.progress = None
        if not quiet and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
            )

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: Any) -> None:
        if self.quiet:
            return
        import time

        from gblr_compress.progress import PHASES

        phase, done, total = event.phase, event.done, event.total
        label = PHASES.get(phase, phase)
        text = ""
        if event.loss is not None:
            text = f"loss {event.loss:.4g}  cost {event.cost:,}/{event.max_cost:,}"
        if phase not in self.started:
            self.started[phase] = time.perf_counter()
            if self.progress is not None:
                self.tasks[phase] = self.progress.add_task(label, total=max(total, 1), info="")
        if self.progress is not None:
            self.progress.update(self.tasks[phase], completed=done, total=max(total, 1), info=text)
        elif total and done == total:
            took = time.perf_counter() - self.started[phase]
            self.console.print(f"{label}: {done}/{total} in {took:.1f} s" + (f" ({text})" if text else ""))


# Config fields by the flag that sets them, so a field error reads as a flag error.
_FLAGS = {
    "budget": "--budget", "seed": "--seed", "augment": "--augment", "steps": "--steps", "lr": "--lr",
    "loss": "--loss", "max_groups": "--max-blocks", "teacher_cache_mb": "--teacher-cache-mb",
    "activation_mb": "--activation-mb", "time_budget": "--time-budget",
}


def _config(build: Callable[[], Any]) -> Any:
    """``build()`` (the configs from the flags); a field error names the flag."""
    from gblr_compress.errors import ConfigError

    try:
        return build()
    except ConfigError as exc:
        raise InputError(f"{_FLAGS.get(exc.field, exc.field)} {exc.problem}") from None


@main.command("compress", hidden=True)
@click.argument("model", type=click.Path(path_type=str))
@click.option("--budget", "-b", callback=_budget, default=None,
              help="Global fraction of the Linear layers' multiply-adds to keep, in (0, 1] "
                   "(or give --target-fidelity instead).")
@click.option("--target-fidelity", default=None, type=float, metavar="F",
              help="Instead of --budget: write the fastest file (measured in onnxruntime on this machine, "
                   "input shape of the calibration batches) whose held-out mean cosine similarity of the "
                   "outputs to the dense model's (on --heldout, else on the last 20% of the calibration "
                   "batches; with --calib-text also on those texts' words reordered across texts, the shift "
                   "probe, and the lower of the two counts) is at least F, in (0, 1]; budgets with and "
                   "without int8 are searched. Exit 3 with the table when only the dense model meets F.")
@click.option("--allow-dense", is_flag=True,
              help="With --target-fidelity: when only the dense model meets F, write it (exit 0).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Write the compressed graph quantized by onnxruntime's dynamic int8 quantization "
                   "(per-channel weights); its held-out fidelity is measured and checked.")
@click.option("--int8-tolerance", default=0.02, show_default=True, type=click.FloatRange(min=0),
              help="Most held-out mean cosine the int8 file may lose against the float file.")
@click.option("--export-dtype", type=click.Choice(["float32", "float16", "checkpoint"]), default="float32",
              show_default=True,
              help="Float type of the written file; the compression always computes in float32. float16 "
                   "(onnxruntime's converter) is checked on held-out data; checkpoint: float16 for a "
                   "float16 checkpoint, else float32 (bfloat16 is refused: onnxruntime's CPU provider "
                   "cannot run it).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="ONNX file to write.")
@click.option("--factory", default=None, metavar="PKG.MODULE:FN",
              help="Builds the architecture for a state_dict / .safetensors MODEL (safe: nothing is unpickled).")
@click.option("--calib", default=None, type=click.Path(path_type=str),
              help="Calibration data: .pt or .npz with a tensor, tuple/dict of tensors, or a list of batches. "
                   "An encoder's token batches (input_ids) are decoded to text when its tokenizer is found "
                   "(--tokenizer, the model folder, a pickled model's own, or that of the local folder or cached Hub "
                   "model its HuggingFace model was loaded from) and calibrate as --calib-text does.")
@click.option("--keep-calib-tokens", is_flag=True, default=False,
              help="Use --calib's token batches as given: no decoding to text, so no reordered copies and no "
                   "general English sentences beside them.")
@click.option("--calib-text", default=None, type=click.Path(path_type=str),
              help="Calibration texts: .txt (one per line) or .jsonl (a \"text\" field per line), tokenized "
                   "with the model folder's tokenizer (or --tokenizer).")
@click.option("--heldout", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Held-out data that every held-out figure is measured on (the distillation's best "
                   "state, the report's cosine, --min-fidelity, --target-fidelity): .pt / .npz like "
                   "--calib, or .txt / .jsonl texts tokenized like --calib-text. Default: the last 20% "
                   "of the calibration batches. Text from the source the model will serve, unlike the "
                   "calibration text, makes those figures say what users will see.")
@click.option("--tokenizer", default=None, type=click.Path(path_type=str), metavar="DIR",
              help="Folder holding the tokenizer for --calib-text, text --heldout and decoding --calib's tokens "
                   "(default: the model folder, the tokenizer a pickled model carries, as sentence-transformers "
                   "models do, or that of the local folder or cached Hub model a pickled HuggingFace model was "
                   "loaded from).")
@click.option("--shift-probe/--no-shift-probe", default=True, show_default=True,
              help="With --target-fidelity, --calib-text and no --heldout: also decide on the shift probe (the "
                   "held-out texts' words reordered across texts). Held-out texts share the calibration "
                   "file's templates and topics; text unlike them loses more.")
@click.option("--reorder-copies", default=None, type=click.IntRange(min=0), metavar="N",
              help="With --calib-text: train also on N copies of the training texts with their words reordered "
                   "across texts (never held out). Templated or narrow calibration text then carries further to "
                   "text unlike it.  [default: up to 2, keeping the training texts within 1,000; 0 for a causal LM "
                   "and for --target-fidelity's shift probe, which is reordered text]")
@click.option("--general-text", default=None, type=click.IntRange(0, 2000), metavar="N",
              help="With --calib-text: train also on N general English sentences shipped with the package "
                   "(WordNet usage examples; never held out), so a narrow calibration file carries further to "
                   "text unlike it. 0 for a model that serves other languages or text unlike sentences.  "
                   "[default: as many as bring the training texts to 2,000; 0 for a causal LM]")
@click.option("--vocab-share", default=0.0, show_default=True, type=click.FloatRange(0, 1), metavar="R",
              help="Share of the words in each reordered copy replaced by words drawn from the tokenizer's "
                   "vocabulary (0: the copies keep the calibration text's words). Widens what the statistics "
                   "and the distillation see beyond the calibration file's vocabulary: all-MiniLM-L6-v2 kept more with 0.5, "
                   "all-mpnet-base-v2 less.")
@click.option("--copy-lengths", type=click.Choice(["auto", "varied", "same"]), default="auto", show_default=True,
              help="varied: every second reordered copy is dealt into texts of 4-60 words, so lengths the "
                   "calibration file lacks are seen (short templated sentences kept more on long ones); auto: "
                   "so when the training texts average under 15.5 words (long ones lost with it); same: the "
                   "copies keep the file's lengths.")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=2),
              help="Tokens per text row (truncation; causal LMs: packed row length).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Rows per calibration batch made from --calib-text.  [default: 32; 8 for a causal "
                   "LM, whose vocabulary-wide logits make each row costly]")
@click.option("--input-spec", default=None, metavar="SPEC",
              help="Input names, dtypes and shapes for synthetic inputs, e.g. input_ids:int64[8,128].")
@click.option("--steps", default=None, type=click.IntRange(min=0),
              help="Distillation steps (0: init, freeze and export only).  [default: 100, or 5 passes over "
                   "the calibration batches when there are more, the steps beyond 100 only while the "
                   "distillation stays within 3 minutes (timed on its first steps)]")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate of the distilled content (a distillation that has not beaten the "
                   "init on held-out data by half its steps stops and runs once more at a fifth of it).")
@click.option("--loss", type=click.Choice(["auto", "mse", "kl"]), default="auto", show_default=True,
              help="Distillation loss: auto = KL on a single 2-D output (logits), normalized MSE otherwise "
                   "(mse: the 2-D output is an embedding); padded positions are left out.")
@click.option("--augment", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of tokens resampled in augmented copies of token-id calibration batches (0: off).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--data-free", is_flag=True, help="Initialize from the weights alone (no activation statistics).")
@click.option("--no-prune", is_flag=True,
              help="Never prune FFN hidden units (by default each FFN may become a pruned window with a "
                   "least-squares refit when that beats low rank on held-out calibration data).")
@click.option("--max-blocks", default=4, show_default=True, type=click.IntRange(min=1),
              help="Most blocks per layer; few large blocks run fast.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only compress Linear layers whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave Linear layers whose name matches dense (repeatable).")
@click.option("--time-budget", default=None, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Seconds the compression may take (init and distillation): the distillation "
                   "keeps the steps that fit, and does not train when fewer than 20 fit. "
                   "Default: all --steps, however long.")
@click.option("--compress-tied", is_flag=True,
              help="Also compress layers whose weight is tied to another module (default: left dense, reported).")
@click.option("--teacher-cache-mb", default=1024.0, show_default=True, type=click.FloatRange(min=0),
              help="Memory for cached teacher outputs during distillation (results do not change, only time).")
@click.option("--activation-mb", default=1024.0, show_default=True, type=click.FloatRange(min=0),
              help="Memory one distillation forward/backward pass may keep: larger batches run their rows in "
                   "chunks that fit, gradients added up (0: whole batches).")
@click.option("--max-memory", default=None, type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="Memory the run may use (default: what the machine has available); a run estimated to "
                   "need more is refused before the work.")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda when available.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=18))
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-PyTorch check.")
@click.option("--report", default=None, type=click.Path(path_type=str),
              help="Report path (default: next to the output, NAME.report.json).")
@click.option("--min-fidelity", default=None, type=click.FloatRange(-1, 1), metavar="F",
              help="Least held-out cosine between the compressed and the dense model's outputs; below it "
                   "(or when ORT parity fails) exit 3 and write nothing.")
@click.option("--force", is_flag=True,
              help="Write the outputs even when --min-fidelity or ORT parity fails (the report says so).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Silence the warning that loading a pickled MODEL (module or bundle) runs code from it.")
@click.option("--deterministic", is_flag=True,
              help="torch.use_deterministic_algorithms(True): fail rather than run a nondeterministic kernel.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@verbose_option
def compress_cmd(model: str, budget: float | None, target_fidelity: float | None, allow_dense: bool,
                 quantize: str | None, int8_tolerance: float, export_dtype: str, output: str, factory: str | None, calib: str | None,
                 calib_text: str | None, heldout: str | None, tokenizer: str | None, shift_probe: bool,
                 reorder_copies: int | None, general_text: int | None, keep_calib_tokens: bool, vocab_share: float, copy_lengths: str, max_length: int, batch_size: int | None,
                 input_spec: str | None, steps: int | None, lr: float, loss: str, augment: float, seed: int,
                 data_free: bool, no_prune: bool, max_blocks: int, include: tuple[str, ...], exclude: tuple[str, ...],
                 time_budget: float | None, compress_tied: bool, teacher_cache_mb: float, activation_mb: float,
                 max_memory: float | None,
                 device: str, opset: int, no_verify: bool, report: str | None, min_fidelity: float | None,
                 force: bool, trust_checkpoint: bool, deterministic: bool, quiet: bool, as_json: bool) -> None:
    """Compress MODEL's Linear layers to a FLOP budget and export ONNX + a report.

    MODEL is a torch.save'd module or bundle dict (a pickle: loading it runs code from
    the file, so only use files you trust), or a state_dict / .safetensors file with
    --factory (the safe path), or a HuggingFace directory (needs transformers).
    """
    import json
    from dataclasses import replace

    import torch

    from gblr_compress.init import InitConfig
    from gblr_compress.job import Job, run_job
    from gblr_compress.pipeline import CompressConfig, default_distill
    from gblr_compress.report import render_summary

    if deterministic:
        torch.use_deterministic_algorithms(True)
    if budget is not None and target_fidelity is not None:
        raise InputError("give --budget B or --target-fidelity F, not both")
    if budget is None and target_fidelity is None:
        raise InputError("give --budget B (a share of the multiply-adds) or --target-fidelity F")
    if target_fidelity is not None and not 0.0 < target_fidelity <= 1.0:
        raise InputError(f"--target-fidelity must be in (0, 1], got {target_fidelity}")
    if target_fidelity is not None and quantize is not None:
        raise InputError("--target-fidelity already tries int8: leave out --quantize")
    if target_fidelity is not None and export_dtype != "float32":
        raise InputError("--target-fidelity searches float32 and int8 files: leave out --export-dtype")
    if allow_dense and target_fidelity is None:
        raise InputError("--allow-dense only applies with --target-fidelity")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
    config = _config(lambda: CompressConfig(
        budget=1.0 if budget is None else budget, seed=seed, include=include, exclude=exclude, augment=augment, device=device,
        compress_tied=compress_tied, time_budget=time_budget, init=InitConfig(max_groups=max_blocks, data_free=data_free,
                                                                          prune=not no_prune),
        distill=replace(default_distill(), lr=lr, loss=loss, teacher_cache_mb=teacher_cache_mb,
                        activation_mb=activation_mb,
                        # --steps N is exactly N: a first run that gains nothing runs them all
                        **({} if steps is None else {"steps": steps, "epochs": 0.0, "give_up": 0.0})),
    ))
    job = Job(model=model, output=output, factory=factory, calib=calib, input_spec=input_spec,
              calib_text=calib_text, heldout=heldout, tokenizer=tokenizer, shift_probe=shift_probe,
              reorder_copies=reorder_copies, general_text=general_text, keep_calib_tokens=keep_calib_tokens, vocab_share=vocab_share, copy_lengths=copy_lengths, max_length=max_length, batch_size=batch_size,
              max_memory_gb=max_memory, quantize=quantize, int8_tolerance=int8_tolerance, export_dtype=export_dtype,
              trust_checkpoint=trust_checkpoint, min_fidelity=min_fidelity,
              force=force, report=report, opset=opset, verify=not no_verify, config=config)
    console = _console()
    err_console = _console(stderr=True)
    shown: list[str] = []

    def warn(text: str) -> None:  # at once: a pickle warning must come before the load
        shown.append(text)
        err_console.print(f"warning: {text}", soft_wrap=True, markup=False, highlight=False)

    only_dense = None
    with _Bars(err_console, quiet or as_json) as bars:
        if target_fidelity is None:
            result = run_job(job, progress=bars, warn=warn)
        else:
            from gblr_compress.target import OnlyDense, run_target

            try:
                result = run_target(job, target_fidelity, allow_dense, progress=bars, warn=warn)
            except OnlyDense as exc:
                only_dense = exc
    if only_dense is not None:  # not bad input: the answer is "nothing but dense", exit 3
        from gblr_compress.report import render_candidates

        render_candidates(only_dense.candidates, err_console, only_dense.target)
        click.echo(f"error: {only_dense}", err=True)
        click.get_current_context().exit(3)
    click.get_current_context().meta[_WRITTEN] = True  # a later interrupt must not say "nothing written"
    for w in result.warnings:
        if w not in shown:
            err_console.print(f"warning: {w}", soft_wrap=True, markup=False, highlight=False)
    if as_json:
        from gblr_compress.report import report_to_dict

        summary = report_to_dict(result.report)
        click.echo(json.dumps({"totals": summary["totals"], "quality": summary["quality"],
                               "parity": summary["parity"], "seconds": summary["seconds"],
                               "outputs": summary["outputs"], "candidates": summary["candidates"]}))
    elif not quiet:
        render_summary(result.report, console)

if __name__ == "__main__":  # pragma: no cover
    main()
