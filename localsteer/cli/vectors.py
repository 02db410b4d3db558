"""Making, reading and exporting control vectors: extract, inspect, export."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from ..api import DatasetError, format_layers
from .base import FiniteFloat, force_option, gpu_option, main, model_option, progress_bar, threads_option, verbose_option


# --- extract ------------------------------------------------------------------------------------

@main.command()
@model_option
@click.option("--dataset", "-d", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL of {positive, negative} or {prompt, instruction} pairs.")
@click.option("--method", type=click.Choice(["mean", "pca", "instruction", "rewrite"]), default="mean",
              show_default=True,
              help="instruction: one layer, chosen on the validation split (instruction datasets); "
                   "rewrite: the model's own replies rewritten (--rewrite) vs as written, strength "
                   "chosen on the validation split (instruction datasets).")
@click.option("--rewrite", type=click.Choice(["lower", "upper"]), default=None,
              help="With --method rewrite: the rewrite that makes the positive side.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output GGUF control vector.")
@force_option
@threads_option
@gpu_option
@verbose_option
def extract(model: str, dataset: Path, method: str, rewrite: str | None, out: Path, force: bool, threads,
            gpu_layers, verbose: bool) -> None:
    """Extract a control vector from contrastive pairs."""
    if (method == "rewrite") != (rewrite is not None):
        raise click.UsageError("--rewrite goes with --method rewrite, and --method rewrite needs it")
    api.check_output(out, force)
    if not dataset.is_file():
        raise DatasetError(f"dataset not found: {dataset}")
    lm = api.load_model(model, gpu_layers=gpu_layers, verbose=verbose)
    if method == "rewrite":
        res = api.extract_rewrite_vector(lm, dataset, rewrite, progress=progress_bar(f"rewrite-{rewrite} vector"))
        res.vector.save(out, force=force)
        _report(f"{out}: rewrite-{rewrite} vector for {lm.info.name} ({lm.arch}), layers "
                f"{format_layers(res.vector.layers)}, strength x{res.scale:g} chosen on validation",
                "validation accuracy (fluent) by strength: " + " ".join(f"x{s.scale:g}:{s.accuracy:.0%}"
                                                                         for s in res.scores), res.seconds)
        return
    if method == "instruction":
        res = api.extract_instruction_vector(lm, dataset, progress=progress_bar("instruction vector"))
        res.vector.save(out, force=force)
        _report(f"{out}: instruction vector for {lm.info.name} ({lm.arch}), layer {res.layer}, "
                f"weight {res.weight:.2f}",
                "validation accuracy by layer (steering without the instruction): "
                + " ".join(f"{s.layer}:{s.accuracy:.0%}" for s in res.scores), res.seconds)
        return
    pairs = api.load_pairs(dataset)
    n_same = sum(api.same_sides(p) for p in pairs)
    if 0 < n_same < len(pairs):
        click.echo(f"warning: {n_same} of {len(pairs)} pairs in {dataset} have the same positive and negative "
                   "text (up to spacing and case); they add nothing to the vector", err=True)
    result = api.extract_vector(lm, pairs, method=method, dataset_name=dataset.name,
                                progress=progress_bar(f"{len(pairs)} pairs"))
    result.vector.save(out, force=force)
    v = result.vector
    click.echo(f"wrote {out}: {method} vector for {lm.info.name} ({v.arch}), layers "
               f"{format_layers(v.layers)}, n_embd {v.n_embd}")
    click.echo(_norm_line(v.norms()))
    click.echo(f"{result.n_pairs} pairs in {result.seconds:.1f} s ({result.n_pairs / result.seconds:.1f} pairs/s)")


def _report(wrote: str, scores: str, seconds: float) -> None:
    click.echo(f"wrote {wrote}")
    click.echo(scores)
    click.echo(f"done in {seconds:.1f} s")


def _norm_line(norms) -> str:
    return "norms: " + " ".join(f"{il}:{n:.1f}" for il, n in enumerate(norms) if il > 0)


# --- inspect ------------------------------------------------------------------------------------

@main.command()
@click.argument("vector", type=click.Path(dir_okay=False, path_type=Path))
def inspect(vector: Path) -> None:
    """Show what a GGUF control vector holds."""
    v = api.load_vector(vector)
    click.echo(f"file:             {vector}")
    click.echo(f"arch hint:        {v.arch or '(none)'}")
    click.echo(f"layers:           {format_layers(v.layers) or '(all zero)'} of {v.n_layer}")
    click.echo(f"n_embd:           {v.n_embd}")
    for key in ("method", "model_name", "model_sha256", "dataset", "n_pairs", "prescale", "scale",
                "layers", "benign_kl", "benign_kl_scale", "benign_kl_model", "measured"):
        if key in v.meta:
            label = {"layers": "suggested layers", "scale": "suggested scale"}.get(key, key)
            value = v.meta[key]
            if key in ("benign_kl", "benign_kl_scale"):
                value = f"{float(value):.4f}" if key == "benign_kl" else f"{float(value):g}"
            click.echo(f"{label + ':':<18}{value}")
    click.echo(_norm_line(v.norms()))


# --- export -------------------------------------------------------------------------------------

@main.command()
@click.argument("vectors", nargs=-1, required=True, metavar="PATH[:SCALE]...")
@click.option("--scale", type=FiniteFloat(), default=1.0, show_default=True, help="Multiply the whole mix.")
@click.option("--layers", "-l", default=None, help="Keep only these layers, e.g. 8-16.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path))
@force_option
def export(vectors, scale: float, layers: str | None, out: Path, force: bool) -> None:
    """Bake a mix of vectors, scales and layers into one GGUF control vector for llama.cpp."""
    api.check_output(out, force)
    baked = api.bake(vectors, scale, layers)
    baked.save(out, force=force)
    click.echo(f"wrote {out}: layers {format_layers(baked.layers)}, n_embd {baked.n_embd}, "
               f"for {baked.arch or 'any'} models")
    click.echo("use it with llama.cpp (scale and layers are baked in):")
    click.echo(f"  llama-cli -m MODEL.gguf --control-vector {out}")
    click.echo(f"  llama-server -m MODEL.gguf --control-vector {out}")
