"""Merge the replies of IFEval runs made side by side into one results directory.

`localsteer eval --benchmark ifeval` answers one model at a time, on one thread when asked
(`-t 1`). On a machine with two cores, two runs go twice as fast: each model in its own process,
the second into a copy of the results directory. This puts the copy's replies back and remakes
results.json, results.md and results.png from all of them:

    cp -r docs/results/ifeval /tmp/ifeval-05
    localsteer eval --benchmark ifeval -m qwen2.5-coder-1.5b-instruct -o docs/results/ifeval -t 1 &
    localsteer eval --benchmark ifeval -m qwen2.5-coder-0.5b-instruct -o /tmp/ifeval-05 -t 1 &
    wait   # or stop them early with `kill %1 %2` (SIGTERM): each keeps every prompt it finished
    python scripts/ifeval_merge.py /tmp/ifeval-05 docs/results/ifeval --command "localsteer eval \\
        --benchmark ifeval -m qwen2.5-coder-1.5b-instruct -m qwen2.5-coder-0.5b-instruct -o docs/results/ifeval -t 1"

Both directories must have been made with the same settings; a reply both have must be the same
(the same text and scores: the runs are greedy), else nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from localsteer.eval import ifeval_run
from localsteer.fileio import write_text


def _replies(directory: Path) -> dict:
    path = directory / "replies.json"
    try:
        data = json.loads(path.read_text())
        data["settings"], data["replies"]  # noqa: B018 - both must be there
        return data
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise click.ClickException(f"{path} is not the replies of an IFEval run ({type(e).__name__}: {e})") from None


def _answer(reply: dict) -> tuple:
    """What a reply said and how it scored (its seconds differ between runs)."""
    return reply["response"], reply["n_tokens"], reply["strict"], reply["loose"]


@click.command()
@click.argument("other", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("into", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--command", help="The command the merged results are credited to (else INTO's).")
def main(other: Path, into: Path, command: str | None) -> None:
    mine, theirs = (_replies(d) for d in (into, other))
    if mine["settings"] != theirs["settings"]:
        raise click.ClickException(f"settings differ: {mine['settings']} vs {theirs['settings']}")
    differ = [k for k, rep in theirs["replies"].items()
              if k in mine["replies"] and _answer(mine["replies"][k]) != _answer(rep)]
    if differ:
        raise click.ClickException(f"{len(differ)} replies differ between the two, e.g. {differ[0]}")
    new = {k: rep for k, rep in theirs["replies"].items() if k not in mine["replies"]}
    mine["replies"].update(new)
    if command:
        mine["command"] = command
    write_text(into / "replies.json", json.dumps(mine, indent=0, ensure_ascii=False))
    results = ifeval_run.report(mine, ifeval_run.sample_rows(mine["settings"]["sample"]), into)
    click.echo(f"merged {len(new)} replies from {other} into {into}")
    for cell, s in results["cells"].items():
        click.echo(f"  {cell}: {s['n_prompts']} prompts")


if __name__ == "__main__":
    sys.exit(main())
