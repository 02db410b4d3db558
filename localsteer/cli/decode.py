"""Decoding with steering: generate and the chat UI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import api
from .base import (FiniteFloat, ctx_option, directer_options, gpu_option, layers_option, loras_option, main, model_option,
                   reject_topk_option, sampling_options, seed_option, temperature_option, threads_option,
                   vectors_option, verbose_option, when_option)


# --- generate -----------------------------------------------------------------------------------

@main.command()
@model_option
@vectors_option()
@layers_option
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True)
@sampling_options
@ctx_option
@reject_topk_option
@click.option("--reject-minp", type=FiniteFloat(0, 1), default=None,
              help="...and have plain probability >= this x the plain maximum (default 0; needs --reject-topk).")
@click.option("--recovery", type=click.Choice(["reset", "hold", "gradual"]), default="reset",
              show_default=True, help="How steering comes back after a weakened token.")
@click.option("--reject-fold", type=click.Choice(["auto", "none", "case", "recase"]), default="auto",
              show_default=True,
              help="Judge plausibility up to letter case (case: for case-rewrite vectors; recase: and the plain "
                   "model reads the reply in its own casing while the vector spells the words, in pieces "
                   "where needed; auto: case when a vector in use asks for it).")
@click.option("--reject-loop", type=click.Choice(["auto", "joint", "drafted"]), default="auto", show_default=True,
              help="How rejection evaluates both sides: joint (one context, one two-row decode per token; "
                   "faster on CPUs), drafted (two contexts, steered drafts checked in one batch; for GPUs); "
                   "auto: the one this machine's measured decode costs favour (`localsteer doctor` shows it).")
@loras_option
@when_option
@click.option("--instruction", default=None, metavar="TEXT",
              help="DIRECTER: append this instruction to PROMPT and steer it by amplifying its keys (no vector).")
@click.option("--mark", default=None, metavar="TEXT",
              help="DIRECTER: steer this span of PROMPT (it must occur in PROMPT) instead of appending one.")
@directer_options
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--events", is_flag=True, help="With --json: include per-token events.")
@threads_option
@gpu_option
@verbose_option
@click.argument("prompt")
def generate(model, vectors, layers, max_tokens, temperature, top_k, top_p, min_p, seed, n_ctx, reject_topk,
             reject_minp, recovery, reject_fold, reject_loop, loras, when, instruction, mark, alpha, directer_p,
             directer_trials, raw, system, as_json, events, threads, gpu_layers, verbose, prompt) -> None:
    """Generate a reply to PROMPT, steered by control vectors, or by DIRECTER (--instruction,
    --mark): the instruction's keys amplified, each steered token checked against the plain model."""
    if instruction is not None or mark is not None:
        if instruction is not None and mark is not None:
            raise click.UsageError("--instruction appends an instruction, --mark names one in PROMPT: give one")
        if loras or when or reject_topk is not None or reject_minp is not None:
            raise click.UsageError("DIRECTER (--instruction/--mark) has its own test: it does not combine with "
                                   "--reject-*, --lora or --when")
        lm = api.load_model(model, gpu_layers=gpu_layers, verbose=verbose)
        run = api.generate_directer(lm, prompt, instruction, mark, api.Directer(alpha, directer_p, directer_trials),
                                    api.sampling_config(temperature, top_k, top_p, min_p, seed), max_tokens, raw=raw,
                                    system=system, n_threads=threads, stream=None if as_json else _stream_echo,
                                    n_ctx=n_ctx, steering=api.steering_from_specs(lm, vectors, layers))
        if as_json:
            click.echo(json.dumps(run.as_dict(events=events), ensure_ascii=False))
        else:
            click.echo()
            click.echo(run.summary(), err=True)
        return
    if reject_minp is not None and reject_topk is None:
        raise click.UsageError("--reject-minp refines --reject-topk: give --reject-topk K too")
    reject_minp = reject_minp or 0.0
    lm = api.load_model(model, gpu_layers=gpu_layers, verbose=verbose)
    steering = api.steering_from_specs(lm, vectors, layers)
    fold = api.fold_for(vectors, lm) if reject_fold == "auto" else reject_fold
    rejection = api.rejection_config(reject_topk, reject_minp, recovery, fold=fold, loop=reject_loop)
    sampling = api.sampling_config(temperature, top_k, top_p, min_p, seed)
    adapters = api.load_adapters(lm, loras)
    gate = api.load_gate(lm, when) if when else None
    run = api.generate(lm, prompt, steering, sampling=sampling, max_tokens=max_tokens,
                       rejection=rejection, raw=raw, system=system, n_threads=threads, adapters=adapters,
                       stream=None if as_json else _stream_echo, gate=gate, n_ctx=n_ctx)
    if as_json:
        obj = run.as_dict(events=events)
        click.echo(json.dumps(obj, ensure_ascii=False))
    else:
        click.echo()
        click.echo(run.summary(), err=True)


def _stream_echo(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


# --- chat ---------------------------------------------------------------------------------------

@main.command()
@model_option
@vectors_option("Control vector to start with, switched on; repeat to compose. The panel also lists the "
                "shipped and your own vectors for the model.")
@layers_option
@reject_topk_option
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True, help="Per reply.")
@temperature_option
@seed_option
@loras_option
@when_option
@click.option("--instruction", default=None, metavar="TEXT",
              help="Pin this instruction (the system prompt) and amplify it with DIRECTER; the panel edits and "
                   "switches both.")
@directer_options
@threads_option
@gpu_option
def chat(model, vectors, layers, reject_topk, max_tokens, temperature, seed, loras, when, instruction, alpha,
         directer_p, directer_trials, threads, gpu_layers) -> None:
    """Chat with a model in the terminal, steering it as you go."""
    from localsteer_tui import ChatOptions, run

    if when is not None and not Path(when).is_file():
        raise click.ClickException(f"probe file not found: {when}")
    run(ChatOptions(model=model, vectors=tuple(vectors), adapters=tuple(loras), when=when, layers=layers, reject_topk=reject_topk,
                    max_tokens=max_tokens, sampling=api.sampling_config(temperature=temperature, seed=seed),
                    threads=threads, gpu_layers=gpu_layers, instruction=instruction or "", amplify=bool(instruction),
                    directer=api.Directer(alpha, directer_p, directer_trials)))
