"""The `pbs2p-edge` command line. Each command imports its stage only when it runs."""

from __future__ import annotations

import json
import sys

import click

from pbs2p_edge.errors import Pbs2pError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pbs2p-edge")
def cli() -> None:
    """PBS2P compression, sparse-binary ONNX export and a torch-free CPU runtime for causal LLMs.

    Pipeline: compress (HF model -> model.pt) -> export (model.pt -> bundle/) -> generate / bench (bundle/).
    """


@cli.command("eval")
@click.argument("source", required=False)
@click.option(
    "--text",
    "text_path",
    type=click.Path(),
    help="Score this UTF-8 text file instead of the evaluation split.",
)
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Token budget (first N tokens).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads: onnxruntime intra-op threads for a bundle, torch threads otherwise (default: theirs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--ops-library", metavar="PATH", default=None, help="Bundle only: see `generate --help`.")
@click.option("--no-verify-hash", is_flag=True, help="Bundle only: skip the sha256 of its files.")
def eval_command(
    source: str | None,
    text_path: str | None,
    ctx: int,
    tokens: int,
    threads: int | None,
    as_json: bool,
    no_progress: bool,
    ops_library: str | None,
    no_verify_hash: bool,
) -> None:
    """Perplexity of SOURCE on held-out text.

    SOURCE is a compressed model.pt, a Hugging Face model folder, a .gguf file, an embedded model's name
    (`pbs2p-edge models`), or omitted for the embedded default model (SmolLM2-135M-Instruct), all scored in PyTorch with float activations; or a bundle directory
    from `pbs2p-edge export`, scored torch-free with onnxruntime as deployed (the kernels' int7 activations,
    the exported head). Windows of --ctx tokens, non-overlapping, no BOS, each scored alone, over the first
    --tokens tokens of the evaluation split (or --text): the same windows for every kind of SOURCE.
    """
    import time

    from pbs2p_edge import sources

    start = time.perf_counter()
    if source is not None and _is_bundle_dir(source):
        from pbs2p_edge.runtime.perplexity import BundleScorer

        scorer = BundleScorer(
            source, threads=threads, ops_library=ops_library, verify_hash=not no_verify_hash
        )
        kind = scorer.kind
        load_seconds = time.perf_counter() - start
        ids = sources.evaluation_token_list(scorer.encode, tokens, text_path)
        result = scorer.perplexity(ids, ctx=ctx, progress=not no_progress)
    else:
        if ops_library is not None or no_verify_hash:
            raise Pbs2pError("--ops-library and --no-verify-hash apply to a bundle directory only")
        from pbs2p_edge.evaluate import perplexity

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if source is not None and source.endswith(".pt"):
            from pbs2p_edge.checkpoint import build_model, load_checkpoint

            model, tokenizer = build_model(load_checkpoint(source))
            kind = "compressed"
        else:
            model, tokenizer = sources.load_model(source)
            kind = "fp32"
        load_seconds = time.perf_counter() - start
        ids = sources.evaluation_ids(tokenizer, tokens, text_path)
        result = perplexity(model, ids, ctx=ctx, progress=not no_progress)
    result.update(
        source=source or "default",
        kind=kind,
        text=text_path or "corpus evaluation split",
        load_seconds=load_seconds,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f"{result['source']} ({kind}): perplexity {result['ppl']:.3f} over {result['windows']} windows x "
            f"{ctx} tokens ({result['tokens']} tokens) in {result['seconds']:.1f} s (load {load_seconds:.1f} s)"
        )


def _is_bundle_dir(source: str) -> bool:
    """A directory holding manifest.json is a bundle (load_bundle then checks the manifest is ours)."""
    from pathlib import Path

    path = Path(source).expanduser()
    if not path.is_dir():
        return False
    if (path / "manifest.json").exists():
        return True
    if not (path / "config.json").exists():
        raise Pbs2pError(
            f"{path} is neither a bundle (no manifest.json) nor a Hugging Face model folder (no config.json)"
        )
    return False


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models_command(as_json: bool) -> None:
    """The embedded models SOURCE / --model accept by name: size, whether installed, how to install."""
    from pbs2p_edge import sources

    rows = [sources.model_status(model) for model in sources.EMBEDDED_MODELS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        default = " (default)" if row["default"] else ""
        click.echo(
            f"{row['name']}{default}: {row['title']}, {row['parameters']} parameters, "
            f"GGUF {row['gguf_bytes'] / 1e6:.0f} MB, {row['status']}; install: {row['install']}"
        )


@cli.command("replies")
@click.option(
    "--model", "model_path", default=None, help="Model folder, GGUF or embedded name [default model]."
)
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=384, show_default=True, help="Conversations."
)
@click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Reply length cap."
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per generate."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt draw.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Precision of the model's forward (auto: bfloat16 where the CPU has it natively).",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="JSONL conversations file to write.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
def replies_command(
    model_path: str | None,
    count: int,
    max_new_tokens: int,
    batch: int,
    seed: int,
    dtype: str,
    output: str,
    force: bool,
) -> None:
    """Write the model's own greedy replies to questions about calibration articles, as JSONL conversations
    for `compress --e2e-chat-file`: the end-to-end pass then distils the model on its own answers."""
    from pbs2p_edge.errors import require_new_output

    require_new_output(output, force)
    from tqdm.auto import tqdm

    from pbs2p_edge import conversations, sources
    from pbs2p_edge.config import default_e2e_dtype

    prompts = conversations.calibration_prompts(count, seed)
    model, tokenizer = sources.load_model(model_path, default_e2e_dtype() if dtype == "auto" else dtype)
    with tqdm(total=count, desc="replies", unit="conv") as bar:
        made = conversations.generate_replies(
            model, tokenizer, prompts, max_new_tokens, batch, lambda done: bar.update(done - bar.n)
        )
    conversations.write_conversations(made, output)
    click.echo(f"wrote {len(made)} conversations to {output}")


def _add_stage_commands() -> None:
    # Stage command modules import only click at module level; their work is imported when they run.
    from pbs2p_edge.compress.cli import compress_command
    from pbs2p_edge.export.cli import export_command
    from pbs2p_edge.runtime.cli import bench_command, generate_command, verify_command

    for command in (compress_command, export_command, generate_command, bench_command, verify_command):
        cli.add_command(command)


_add_stage_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: Pbs2pError -> `error: ...` on stderr and exit 2; Ctrl-C -> exit 130."""
    try:
        # Without standalone mode click returns (not raises) a command's ctx.exit(code).
        code = cli.main(args=argv, prog_name="pbs2p-edge", standalone_mode=False)
    except Pbs2pError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
