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
    from .. import refusal as rf
    from ..models import fingerprint

    sets = rf.load_sets(dataset_dir)
    if not force:
        for f in rf.FILES.values():
            if (out / f).exists():
                raise click.ClickException(f"{out / f} exists (use --force to overwrite)")
    lm = api.load_model(model, verbose=verbose)
    sel = rf.build(lm, sets, out, model_sha256=fingerprint(lm.path), force=force, inlp_rounds=inlp_rounds,
                   kl_max=kl_max, log=lambda s: click.echo(s, err=True), progress=progress_bar("candidates"))
    click.echo((out / rf.FILES["selection"]).read_text())
    click.echo(f"wrote {', '.join(str(out / f) for f in rf.FILES.values())}")
    click.echo("use in llama.cpp:")
    click.echo(f"  llama-cli -m MODEL.gguf --lora {out / rf.FILES['ablation']}        # refuses less")
    click.echo(f"  llama-cli -m MODEL.gguf --control-vector {out / rf.FILES['addition']}   # refuses more")
    del sel


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
    from .. import refusal as rf
    from .. import refusal_table as rt

    if out is not None:
        api.check_output(out, force)
    sets = rf.load_sets(dataset_dir)
    missing = [f for k, f in rf.FILES.items() if k != "selection" and not (directory / f).is_file()]
    if missing:
        raise click.ClickException(f"{directory} lacks {', '.join(missing)}: run `localsteer refusal direction` first")
    lm = api.load_model(model, verbose=verbose)
    click.echo(rt.TABLE_HEAD)
    rows = rt.table(lm, sets, directory, split=split, max_tokens=max_tokens, limit=limit, log=click.echo,
                    progress=progress_bar("replies"))
    n_h = len(sets.harmful[split][:limit] if limit else sets.harmful[split])
    n_b = len(sets.harmless[split][:limit] if limit else sets.harmless[split])
    md = rt.table_markdown(lm, rows, split, n_h, n_b, max_tokens)
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
    from ..dataset import load_split_prompts
    from ..probe import Scores

    lm = api.load_model(model, verbose=verbose)
    gate = api.load_gate(lm, probe_file)
    pos, neg = load_split_prompts(positive), load_split_prompts(negative)

    def pick(d: dict) -> list[str]:
        return [p for s in d for p in d[s]] if split == "all" else d[split]

    prompts = pick(pos) + pick(neg)
    if not pick(pos) or not pick(neg):
        raise click.ClickException(f"need positive and negative prompts in the {split} split")
    probs = gate.probe.prompt_probability(lm, [api.chat_prompt(lm, p) for p in prompts], progress=progress_bar("prompts"))
    labels = [True] * len(pick(pos)) + [False] * len(pick(neg))
    click.echo(f"{probe_file.name} (layer {gate.probe.layer}, threshold {gate.probe.threshold:.2f}) on {split}: "
               + Scores.of(probs >= gate.probe.threshold, labels).line())
