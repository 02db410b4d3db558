"""The `main` group, the options and the helpers every command module shares."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading

import click

from .. import __version__, api
from ..api import DEFAULT_MODEL, LocalsteerError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (temporary files, child processes)
    runs; the process then exits 143."""


def _on_sigterm(signum: int, frame) -> None:
    raise Terminated()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    """The command line's edge: every user-caused error becomes one line on stderr and exit
    status 1 (usage errors too, which click would print with the usage text and status 2);
    Ctrl-C prints one line and exits 130, SIGTERM 143, after the command's cleanup ran."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocalsteerError as e:
            raise click.ClickException(_one_line(e)) from None
        except ValueError as e:  # bad option values detected in the library
            raise click.ClickException(_one_line(e)) from None
        except KeyboardInterrupt as e:
            raise _Interrupted(e) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prog_name = prog_name or "localsteer"  # also under `python -m localsteer.cli`
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"Error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            sys.exit(1)
        except (_Interrupted, click.Abort) as e:
            terminated = isinstance(getattr(e, "signal", None), Terminated)
            click.echo(f"localsteer: {'terminated' if terminated else 'interrupted'}", err=True)
            sys.exit(143 if terminated else 130)
        except BrokenPipeError:  # e.g. `localsteer generate ... | head -1`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        sys.exit(code if isinstance(code, int) else 0)  # click returns --help's status here


class _Interrupted(Exception):
    """A KeyboardInterrupt (or `Terminated`) carried past click, which would print "Aborted!"."""

    def __init__(self, signal: KeyboardInterrupt):
        super().__init__("interrupted")
        self.signal = signal


def progress_bar(label: str):
    """A click progress bar on stderr driven by (done, total) callbacks (only on a terminal)."""
    state: dict = {}
    if not sys.stderr.isatty():
        return None

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
            bar.__enter__()
            state["bar"] = bar
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    return update


class FiniteFloat(click.FloatRange):
    """A number within optional bounds that must be finite (click's FloatRange lets nan pass)."""

    name = "number"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv

    def _describe_range(self) -> str:
        return "finite" if self.min is None and self.max is None else super()._describe_range()


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="localsteer")
def main() -> None:
    """Steer local GGUF models with control vectors, through llama.cpp."""


model_option = click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                            help="GGUF path or known model name (see `localsteer models list`).")
threads_option = click.option("--threads", "-t", type=click.IntRange(min=1), default=None,
                              help="CPU threads (default: all cores, up to 8).")
gpu_option = click.option("--gpu-layers", "-ngl", type=click.IntRange(min=0), default=999, show_default=True,
                          help="Layers to offload to the GPU (CUDA/Metal builds).")
verbose_option = click.option("--verbose", is_flag=True, help="Show llama.cpp's own log.")
force_option = click.option("--force", is_flag=True, help="Overwrite the output file.")
seed_option = click.option("--seed", "-s", type=click.IntRange(-1, 0xFFFFFFFF), default=-1, show_default=True,
                           help="Sampling seed (-1: random, as in llama.cpp).")
temperature_option = click.option("--temperature", "--temp", type=FiniteFloat(min=0), default=0.8,
                                  show_default=True, help="0 for greedy decoding.")
_VECTOR_HELP = ("a .gguf file, or the name of a shipped or your own vector for the model (e.g. happy-sad), "
                "optionally scaled (default: its suggested scale)")


def vectors_option(help: str = "Control vector; repeat to compose (weighted sum).", **kw):
    """--vector/-v VECTOR[:SCALE], repeatable (the steering of generate, chat and kl)."""
    return click.option("--vector", "-v", "vectors", multiple=True, metavar="VECTOR[:SCALE]",
                        help=f"{help} VECTOR is {_VECTOR_HELP}.", **kw)


layers_option = click.option("--layers", "-l", default=None,
                             help="Active layers of the mix, e.g. 8-16 or 4-6,10 (default: the vectors' own).")
loras_option = click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
                            help="LoRA adapter (e.g. refusal-ablate.gguf), optionally scaled; repeatable.")
when_option = click.option("--when", "when", default=None, metavar="PROBE",
                           help="Steer only if this probe (`localsteer probe train`) fires on the prompt.")
reject_topk_option = click.option("--reject-topk", type=click.IntRange(min=1), default=None,
                                  help="Dynamic rejection: a steered token must be in the plain model's top K.")


def directer_options(f):
    """DIRECTER's settings: --alpha, --directer-p, --directer-trials."""
    for option in reversed([
        click.option("--alpha", type=FiniteFloat(min=0, min_open=True), default=100.0, show_default=True,
                     help="DIRECTER: the factor on the instruction's keys."),
        click.option("--directer-p", type=FiniteFloat(0, 1, min_open=True), default=0.5, show_default=True,
                     help="DIRECTER: a steered token passes if its plain probability > this x the plain maximum."),
        click.option("--directer-trials", type=click.IntRange(min=1), default=10, show_default=True,
                     help="DIRECTER: layer sets tried per token (all layers, then the most sensitive half, ...)."),
    ]):
        f = option(f)
    return f


def sampling_options(f):
    """The sampling chain (llama.cpp's defaults) and the seed."""
    for option in reversed([
        temperature_option,
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0: off."),
        click.option("--top-p", type=FiniteFloat(0, 1), default=0.95, show_default=True),
        click.option("--min-p", type=FiniteFloat(0, 1), default=0.05, show_default=True),
        seed_option,
    ]):
        f = option(f)
    return f


ctx_option = click.option("--ctx", "-c", "n_ctx", type=click.IntRange(min=16), default=4096, show_default=True,
                          help="Context size in tokens (prompt and reply), at most the model's training context.")

# the refusal datasets: the default data of `refusal`, `probe` and `kl`
REFUSAL_DATA = api.shipped.datasets() / "refusal"
