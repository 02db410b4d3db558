"""Measuring steering: `kl` (side effects), `kts` (KL-then-steer training), `eval` (the instruction grid)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
import numpy as np

from .. import api
from .base import (FiniteFloat, directer_options, force_option, layers_option, loras_option, main, model_option,
                   progress_bar, threads_option, vectors_option, verbose_option)


# --- side effects -------------------------------------------------------------------------------

@main.command()
@model_option
@vectors_option()
@layers_option
@loras_option
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Benign prompts (JSONL: prompt, split) [default: the built-in set].")
@click.option("--split", type=click.Choice(["train", "validation", "test", "all"]), default="test", show_default=True)
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=16, show_default=True,
              help="Plain reply length read per prompt.")
@click.option("--save", is_flag=True,
              help="Store the result in the vector file (one vector): localsteer.benign_kl at that scale.")
@verbose_option
def kl(model, vectors, layers, loras, prompts, split, max_tokens, save, verbose) -> None:
    """Side effects: KL(plain ‖ steered) of next-token distributions on benign prompts, read along
    the plain model's own greedy replies."""
    if not vectors and not loras:
        raise click.ClickException("give a --vector or a --lora to measure")
    if save and (len(vectors) != 1 or loras or layers):
        raise click.ClickException("--save stores the KL of one vector at one scale: give exactly one --vector "
                                   "and no --lora or --layers")
    lm = api.load_model(model, verbose=verbose)
    steering = api.steering_from_specs(lm, vectors, layers)
    adapters = api.load_adapters(lm, loras)
    value, n = api.benign_kl(lm, steering, adapters, prompts or api.BENIGN, split, max_tokens,
                             progress=progress_bar("benign prompts"))
    click.echo(f"benign KL(plain ‖ steered): {value:.4f}  ({n} prompts, {split} split, <= {max_tokens} tokens each; "
               f"steering: {steering.describe()}{'; adapters: ' + ', '.join(loras) if loras else ''})")
    if save:
        path, _ = api.vector_spec(vectors[0], lm)
        scale = steering.parts[0][1]
        v = api.load_vector(path).with_meta(benign_kl=value, benign_kl_scale=scale, benign_kl_model=lm.info.name)
        v.save(path, force=True)
        click.echo(f"stored in {path}: benign_kl={value:.4f} at scale {scale:g} on {lm.info.name}")


@main.group()
def kts() -> None:
    """KL-then-steer: a LoRA adapter that keeps a vector's benign side effects small (needs the train extra)."""


@kts.command("train")
@model_option
@click.option("--vector", "-v", "vector_spec", required=True, metavar="VECTOR[:SCALE]",
              help="The control vector the adapter goes with (default scale: its suggested one).")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Benign prompts (JSONL: prompt, split); their train split is used. "
                   "[default: the built-in benign set and the harmless refusal requests]")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Adapter (.gguf).")
@force_option
def kts_train(model, vector_spec, prompt_files, rank, steps, batch, lr, out, force) -> None:
    """Train a LoRA so that the model steered by VECTOR keeps the plain model's next-token
    distributions on benign prompts; use it with the vector: `--lora OUT -v VECTOR`."""
    result = api.train_kts(model, vector_spec, out, prompt_files, rank=rank, steps=steps, batch=batch, lr=lr,
                           force=force, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out}: KL on a training batch {result.start_kl:.4f} without the adapter, "
               f"{np.mean(result.losses[-10:]):.4f} with it (last 10 steps); {result.seconds:.0f} s")
    click.echo(f"use it with the vector: localsteer generate --lora {out} -v {vector_spec} ...")


# --- eval ---------------------------------------------------------------------------------------

ALL_TYPES = "lowercase,uppercase,json,include_word,exclude_word,short,no_commas"


@main.command("eval")
@click.option("--benchmark", type=click.Choice(["grid", "ifeval"]), default="grid", show_default=True,
              help="grid: the instruction-vector grid below; ifeval: IFEval's prompts, plain / DIRECTER / "
                   "a matching vector with rejection, scored with IFEval's checkers.")
@click.option("--model", "-m", "model_names", multiple=True, default=["qwen2.5-coder-0.5b-instruct"],
              show_default=True, help="Repeat for several models.")
@click.option("--types", default=ALL_TYPES, show_default=True, help="Instruction types (comma-separated).")
@click.option("--compose", multiple=True, default=["lowercase+exclude_word"], show_default=True,
              metavar="A+B", help="Pairs of types to steer together (joint accuracy).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N test prompts and N task questions.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=None,
              help="Per reply [default: 48 for the grid, 1024 for ifeval].")
@click.option("--sample", type=click.IntRange(min=1, max=541), default=200, show_default=True,
              help="ifeval: a fixed stratified sample of this many of the 541 prompts.")
@click.option("--reject-topk", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--reject-minp", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Rejection's second test: plain probability >= this x the plain maximum (0: off).")
@click.option("--reject-fold", type=click.Choice(["auto", "none", "case", "recase"]), default="auto",
              show_default=True, help="Rejection's plausibility up to letter case (auto: what each vector asks for).")
@click.option("--oversteer", type=FiniteFloat(min=0, min_open=True), default=4.0, show_default=True,
              help="Strength multiplier of the 'over' conditions.")
@click.option("--conditions", default=None, help="Only these conditions (comma-separated; default: all).")
@directer_options
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("eval-results"),
              show_default=True, help="Directory for results.json and results.md (a rerun resumes).")
@threads_option
@verbose_option
def eval_(benchmark, model_names, types, compose, limit, max_tokens, sample, reject_topk, reject_minp, reject_fold,
          oversteer, conditions, alpha, directer_p, directer_trials, out, threads, verbose) -> None:
    """Instruction-following accuracy, task fidelity and fluency with and without steering."""
    if threads:
        os.environ["LOCALSTEER_THREADS"] = str(threads)  # every context this process makes
    if benchmark == "ifeval":
        cond = [c for c in (conditions or "").split(",") if c] or list(api.IFEVAL_CONDITIONS)
        if set(cond) - set(api.IFEVAL_CONDITIONS):
            raise click.ClickException(f"unknown condition(s) {', '.join(sorted(set(cond) - set(api.IFEVAL_CONDITIONS)))}; "
                                       f"use {', '.join(api.IFEVAL_CONDITIONS)}")
        for name in ("replies.json", "results.json", "results.md", "results.png"):
            api.check_output(out / name, force=True)  # resumed, but they must be writable files
        models = [(name, api.load_model(name, verbose=verbose)) for name in model_names]
        results = api.evaluate_ifeval(models, out, cond, sample=sample, limit=limit, max_tokens=max_tokens or 1024,
                                      settings=api.Directer(alpha, directer_p, directer_trials), log=click.echo,
                                      command=" ".join(["localsteer"] + [shlex.quote(a) for a in sys.argv[1:]]))
        click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'} ({len(results['cells'])} cells)")
        return
    max_tokens = max_tokens or 48
    CONDITIONS = api.EVAL_CONDITIONS
    cond_list = [c for c in (conditions or "").split(",") if c] or list(CONDITIONS)
    if set(cond_list) - set(CONDITIONS):
        raise click.ClickException(f"unknown condition(s): {', '.join(sorted(set(cond_list) - set(CONDITIONS)))}; "
                                   f"use {', '.join(CONDITIONS)}")
    type_list = [t for t in types.split(",") if t]
    unknown = set(type_list) - set(ALL_TYPES.split(","))
    if unknown:
        raise click.ClickException(f"unknown instruction type(s): {', '.join(sorted(unknown))}")
    pairs = []
    for spec in compose:
        a, sep, b = spec.partition("+")
        if not sep or a not in ALL_TYPES.split(",") or b not in ALL_TYPES.split(","):
            raise click.ClickException(f"bad --compose {spec!r}: use two types joined by +")
        pairs.append((a, b))
    api.check_eval_settings(out, {"max_tokens": max_tokens, "reject_topk": reject_topk, "reject_minp": reject_minp,
                                  "reject_fold": reject_fold, "oversteer": oversteer})
    models = [(name, api.load_model(name, verbose=verbose)) for name in model_names]
    results = api.evaluate(models, type_list, out, limit=limit, max_tokens=max_tokens, topk=reject_topk,
                           compose=pairs, log=click.echo, oversteer=oversteer, conditions=cond_list,
                           minp=reject_minp, fold=reject_fold)
    png = out / "results.png"
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}"
               + (f", {png}" if png.is_file() else " (no plot: pip install 'localsteer[plot]')")
               + f" ({len(results.data['cells'])} cells)")
