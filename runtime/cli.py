"""`pbs2p-edge generate` and `pbs2p-edge bench` (click only at module level; the runtime loads when they run)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

NO_VERIFY_HASH_HELP = "Check the bundle's file sizes but skip their sha256 (faster load on slow devices)."
OPS_LIBRARY_HELP = (
    "Register this custom-op library instead of the installed pbs2p-edge's (e.g. the bundle's own copy); "
    "also $PBS2P_EDGE_OPS_LIBRARY. Never taken from the bundle unless named here."
)


def trust_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """`--ops-library PATH` and `--no-verify-hash`, shared by generate, bench and eval."""
    function = click.option("--no-verify-hash", is_flag=True, help=NO_VERIFY_HASH_HELP)(function)
    return click.option("--ops-library", metavar="PATH", default=None, help=OPS_LIBRARY_HELP)(function)


def _read_prompt(prompt: str) -> str:
    """`-` reads the prompt from stdin as strict UTF-8; anything else is the prompt itself."""
    from pbs2p_edge.errors import Pbs2pError

    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Pbs2pError("the prompt on stdin is not valid UTF-8") from None


@click.command("generate")
@click.argument("bundle", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Prompt text, or - to read it from stdin (UTF-8).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template (instruct models).")
@click.option(
    "--system", default=None, help="System message for --chat (default: the template's own, if any)."
)
@click.option(
    "-n", "--max-new-tokens", type=int, default=128, show_default=True, help="Stop after this many."
)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy; > 0 samples.")
@click.option(
    "--top-k", type=int, default=0, show_default=True, help="Sample from the k most likely (0 = all)."
)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1 = off).")
@click.option(
    "--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off; 1.1-1.3 typical."
)
@click.option("--seed", type=int, default=None, help="Random seed: the same seed gives the same text.")
@click.option(
    "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: physical cores)."
)
@click.option(
    "--prefill-chunk",
    type=int,
    default=None,
    help="Prompt tokens per onnxruntime run (less memory; default: all).",
)
@click.option("--stats", is_flag=True, help="Print token counts and speeds to stderr at the end.")
@trust_options
def generate_command(
    bundle: str,
    prompt: str,
    chat: bool,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
    threads: int | None,
    prefill_chunk: int | None,
    stats: bool,
    ops_library: str | None,
    no_verify_hash: bool,
) -> None:
    """Generate text from BUNDLE (a directory made by `pbs2p-edge export`), streamed to stdout.

    Needs only onnxruntime, numpy and tokenizers. Ends at the end-of-sequence token, --max-new-tokens, or the
    model's context. A prompt longer than the context is refused. Ctrl-C stops, keeps what was printed and
    exits with 130. The bundle's files are checked against its manifest (sizes, sha256) before loading.
    """
    from pbs2p_edge.errors import Pbs2pError
    from pbs2p_edge.runtime.generate import Generator

    if max_new_tokens < 1:
        raise Pbs2pError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    text = _read_prompt(prompt)
    generator = Generator(
        bundle,
        threads=threads,
        prefill_chunk=prefill_chunk,
        ops_library=ops_library,
        verify_hash=not no_verify_hash,
    )
    generation = generator.start(
        text,
        max_new_tokens,
        chat=chat,
        system=system,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    result = generation.result
    room = generator.context_length - len(result.prompt_token_ids)
    if max_new_tokens > room:
        click.echo(
            f"warning: only {room} tokens fit in the context after the prompt; stopping there", err=True
        )
    out = sys.stdout
    try:
        for piece in generation:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        click.echo(f"interrupted after {len(result.token_ids)} tokens", err=True)
        sys.exit(130)
    out.write("\n")
    out.flush()
    if stats:
        click.echo(
            f"{len(result.prompt_token_ids)} prompt tokens, {len(result.token_ids)} generated "
            f"(stop: {result.stop_reason}); prefill {result.prefill_seconds * 1e3:.1f} ms, "
            f"time to first token {result.time_to_first_token * 1e3:.1f} ms, "
            f"decode {result.decode_tokens_per_second:.1f} tok/s",
            err=True,
        )


@click.command("bench")
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option(
    "--pp", type=int, default=128, show_default=True, help="Prompt-processing tokens (one prefill)."
)
@click.option("--tg", type=int, default=128, show_default=True, help="Token-generation steps (decode).")
@click.option("-r", "--reps", type=int, default=3, show_default=True, help="Measured repetitions.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Unmeasured repetitions first.")
@click.option("-t", "--threads", "threads_text", default=None, help="Thread counts to sweep, e.g. 1,2.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the full report here.")
@click.option(
    "--plot", "plot_path", type=click.Path(), default=None, help="PNG: tok/s and memory per bundle."
)
@click.option("--profile", is_flag=True, help="Also profile one decode step per bundle: ops vs Python.")
@click.option(
    "--profile-steps", type=int, default=16, show_default=True, help="Decode steps averaged by --profile."
)
@click.option(
    "--prefill-chunk", type=int, default=None, help="Prompt tokens per run in pp (default: all at once)."
)
@trust_options
def bench_command(
    bundles: tuple[str, ...],
    pp: int,
    tg: int,
    reps: int,
    warmup: int,
    threads_text: str | None,
    json_path: str | None,
    plot_path: str | None,
    profile: bool,
    profile_steps: int,
    prefill_chunk: int | None,
    ops_library: str | None,
    no_verify_hash: bool,
) -> None:
    """Measure BUNDLES side by side, llama-bench style: prefill and decode speed, latency, load time, memory.

    Each bundle runs in its own process (so its RSS is its own); repetitions are interleaved across bundles
    so the ratios hold on a busy machine. Prints a markdown table.
    """
    import json

    from pbs2p_edge.errors import Pbs2pError, atomic_path
    from pbs2p_edge.runtime.bench import BenchSettings, parse_threads, run_bench
    from pbs2p_edge.runtime.report import render_markdown

    if profile_steps < 1:
        raise Pbs2pError(f"--profile-steps must be at least 1, got {profile_steps}")
    options = dict(pp=pp, tg=tg, reps=reps, warmup=warmup, profile=profile, profile_steps=profile_steps)
    options.update(ops_library=ops_library, verify_hash=not no_verify_hash)
    if prefill_chunk is not None:
        options["prefill_chunk"] = prefill_chunk
    if threads_text is not None:
        options["threads"] = parse_threads(threads_text)
    report = run_bench(list(bundles), BenchSettings(**options))
    click.echo(render_markdown(report))
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from pbs2p_edge.runtime.plot import plot_report

        plot_report(report, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--ops-library", metavar="PATH", default=None, help=OPS_LIBRARY_HELP)
def verify_command(bundle: str, ops_library: str | None) -> None:
    """Check BUNDLE against its manifest: every path inside the bundle, every file's size and sha256, and
    that the ops library this runtime would register (the installed one, or --ops-library) runs its graph.

    Exit 0 with a summary; exit 2 with one line naming the first bad file. Builds no onnxruntime session.
    """
    from pbs2p_edge.errors import Pbs2pError
    from pbs2p_edge.runtime.bundle import load_bundle

    loaded = load_bundle(bundle, ops_library=ops_library, verify_hash=True, warn=lambda message: None)
    files = loaded.files
    if files is None:
        raise Pbs2pError(
            f"bundle {loaded.path} records no file sizes or hashes (exported by an older pbs2p-edge): re-export it"
        )
    click.echo(
        f"{loaded.path}: OK: {files.files} files, {files.bytes / 2**20:.1f} MiB, sizes and sha256 match the manifest"
    )
    if loaded.ops_library is not None and loaded.ops_info is not None:
        click.echo(f"ops library: {loaded.ops_library} ({loaded.ops_info.describe()})")
    else:
        click.echo("ops library: none needed")
    if files.unlisted:
        shown = ", ".join(files.unlisted[:5]) + (" ..." if len(files.unlisted) > 5 else "")
        click.echo(f"not in the manifest (ignored, never read by the runtime): {shown}")
