"""The `main` group, the options and the helpers every command module shares."""

from __future__ import annotations

import sys

import click

from .. import __version__, api
from ..errors import LocalsteerError
from ..models import DEFAULT_MODEL


class _Group(click.Group):
    """Turns every user-caused error into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocalsteerError as e:
            raise click.ClickException(str(e)) from None
        except ValueError as e:  # bad option values detected in the library
            raise click.ClickException(str(e)) from None


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


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="localsteer")
def main() -> None:
    """Steer local GGUF models with control vectors, through llama.cpp."""


model_option = click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                            help="GGUF path or known model name (see `localsteer models list`).")
threads_option = click.option("--threads", "-t", type=int, default=None,
                              help="CPU threads (default: all cores, up to 8).")
gpu_option = click.option("--gpu-layers", "-ngl", type=int, default=999, show_default=True,
                          help="Layers to offload to the GPU (CUDA/Metal builds).")
verbose_option = click.option("--verbose", is_flag=True, help="Show llama.cpp's own log.")
force_option = click.option("--force", is_flag=True, help="Overwrite the output file.")

# the refusal datasets: the default data of `refusal`, `probe` and `kl`
REFUSAL_DATA = api.REPO / "vectors" / "datasets" / "refusal"
