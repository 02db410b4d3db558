"""The refusal direction (`refusal direction|table`) and probes (`probe train|test`)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .base import REFUSAL_DATA, FiniteFloat, force_option, main, model_option, progress_bar, verbose_option


# --- refusal ------------------------------------------------------------------------------------



@main.group()
def refusal() -> None:
    """The refusal direction: select it, ablate it (a LoRA adapter), add it, compare with INLP."""


@refusal.command("direction")
@model_option
@click.option("--datasets", "dataset_dir", type=click.Path(file_okay=False, path_type=Path), default=REFUSAL_DATA,
              show_default=True, help="Directory with harmful.jsonl and harmless.jsonl.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the vector, the adapters and selection.md.")
@click.option("--inlp-rounds", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--kl-max", type=FiniteFloat(min=0, min_open=True), default=0.1, show_default=True,
              help="Largest KL(plain || ablated) on the harmless validation prompts a candidate may have.")
@force_option
@verbose_option
def refusal_direction(model, dataset_dir, out, inlp_rounds, kl_max, force, verbose) -> None:
    """Select the refusal direction on the validation split and write the interventions:
    refusal-add.gguf (control vector), refusal-ablate.gguf (LoRA: directional ablation),
    inlp-project.gguf and inlp-flip.gguf (LoRA: INLP), random-ablate.gguf (control). The candidate
    scores are kept in candidates.json there: a rerun (--force, e.g. another --kl-max) reuses them,
    and an interrupted run resumes."""
    lm = api.load_model(model, verbose=verbose)
    files = api.refusal_direction(lm, dataset_dir, out, inlp_rounds=inlp_rounds, kl_max=kl_max, force=force,
                                  log=lambda s: click.echo(s, err=True), progress=progress_bar("candidates"))
    click.echo(files["selection"].read_text())
    click.echo(f"wrote {', '.join(str(f) for f in files.values())}")
    click.echo("use in llama.cpp:")
    click.echo(f"  llama-cli -m MODEL.gguf --lora {files['ablation']}        # refuses less")
    click.echo(f"  llama-cli -m MODEL.gguf --control-vector {files['addition']}   # refuses more")


@refusal.command("table")
@model_option
@click.option("--datasets", "dataset_dir", type=click.Path(file_okay=False, path_type=Path), default=REFUSAL_DATA,
              show_default=True)
@click.option("--dir", "-d", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="What `localsteer refusal direction` wrote.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N prompts of each kind.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (Markdown) here.")
@force_option
@verbose_option
def refusal_table(model, dataset_dir, directory, split, limit, max_tokens, out, force, verbose) -> None:
    """Refusal rates, harmless KL, perplexity and speed of every intervention, on one table."""
    if out is not None:
        api.check_output(out, force)
    lm = api.load_model(model, verbose=verbose)
    md = api.refusal_table(lm, dataset_dir, directory, split=split, limit=limit, max_tokens=max_tokens,
                           log=click.echo, progress=progress_bar("replies"))
    if out is not None:
        api.write_text(out, md)
        click.echo(f"wrote {out}")


# --- probes -------------------------------------------------------------------------------------

@main.group()
def probe() -> None:
    """Linear probes on prompt activations: steer only the prompts a probe flags (--when)."""


@probe.command("train")
@model_option
@click.option("--positive", type=click.Path(dir_okay=False, path_type=Path), default=REFUSAL_DATA / "harmful.jsonl",
              show_default=True, help="Prompts the probe should fire on (JSONL: prompt, split).")
@click.option("--negative", type=click.Path(dir_okay=False, path_type=Path), default=REFUSAL_DATA / "harmless.jsonl",
              show_default=True, help="Prompts it should not fire on.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Probe file (.gguf).")
@force_option
@verbose_option
def probe_train(model, positive, negative, out, force, verbose) -> None:
    """Train a probe: logistic regression per layer on the train split, layer and threshold chosen
    on validation, precision and recall on test."""
    api.check_output(out, force)
    lm = api.load_model(model, verbose=verbose)
    result = api.train_probe(lm, positive, negative, progress=progress_bar("prompts"))
    click.echo(result.report())
    result.probe.save(out, force=force)
    click.echo(f"wrote {out}")


@probe.command("test")
@model_option
@click.argument("probe_file", metavar="PROBE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--positive", type=click.Path(dir_okay=False, path_type=Path), default=REFUSAL_DATA / "harmful.jsonl",
              show_default=True)
@click.option("--negative", type=click.Path(dir_okay=False, path_type=Path), default=REFUSAL_DATA / "harmless.jsonl",
              show_default=True)
@click.option("--split", type=click.Choice(["train", "validation", "test", "all"]), default="test", show_default=True)
@verbose_option
def probe_test(model, probe_file, positive, negative, split, verbose) -> None:
    """Accuracy, precision and recall of PROBE on labelled prompts."""
    lm = api.load_model(model, verbose=verbose)
    gate, scores = api.score_probe(lm, probe_file, positive, negative, split, progress=progress_bar("prompts"))
    click.echo(f"{probe_file.name} (layer {gate.probe.layer}, threshold {gate.probe.threshold:.2f}) on {split}: "
               + scores.line())
