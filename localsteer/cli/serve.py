"""`localsteer serve`: the OpenAI-compatible server (localsteer/server.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .base import (layers_option, loras_option, main, model_option, reject_topk_option, threads_option, vectors_option,
                   verbose_option, when_option)


@main.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the server to your network: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--slots", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Requests generated at once (each a context of --ctx tokens).")
@click.option("--queue", type=click.IntRange(0, 10_000), default=16, show_default=True,
              help="Requests that may wait for a slot; beyond them, 503 with Retry-After.")
@click.option("--ctx", "-c", "n_ctx", type=click.IntRange(min=64), default=4096, show_default=True,
              help="Context size of each slot (prompt and reply).")
@click.option("--batch", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Decode the requests steered by vectors alone in one batch, each row with its own vector "
                   "(auto: when as many requests at once make a batch cheaper than their rows one by one, "
                   "by the machine's measured decode costs).")
@click.option("--api-key", default=None, envvar="LOCALSTEER_API_KEY",
              help="Require `Authorization: Bearer KEY` (also $LOCALSTEER_API_KEY).")
@vectors_option("Default steering for requests without a `steering` field; repeat to compose. The vectors "
                "given here can also be named by requests.")
@layers_option
@reject_topk_option
@loras_option
@when_option
@threads_option
@verbose_option
def serve(model, host, port, slots, queue, n_ctx, batch, api_key, vectors, layers, reject_topk, loras, when, threads,
          verbose) -> None:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) in which each
    request may choose its own steering (the `steering` body field; docs/guide.md)."""
    lm = api.load_model(model, verbose=verbose)
    name = model if model in api.KNOWN_MODELS else Path(model).stem
    api.serve(lm, name, host, port, slots, queue, n_ctx, api_key, vectors, layers, reject_topk, threads, loras, when,
              batch, log=lambda line: click.echo(line, err=True), verbose=verbose)
