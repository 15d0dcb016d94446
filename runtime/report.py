"""Markdown rendering of a bench report (the dict `run_bench` returns)."""

from __future__ import annotations

from typing import Any

MIB = 2**20


def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def results_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    pp, tg = settings["pp"], settings["tg"]
    header = (
        f"| bundle | weights | threads | size MiB | load s | pp{pp} tok/s | tg{tg} tok/s | TTFT ms "
        "| decode p50 / p95 ms | decode GB/s | peak RSS load MiB | peak RSS gen MiB | KV MiB | RSS / budget |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in report["results"]:
        lines.append(
            f"| {row['name']} | {row['weights']} | {row['threads']} | {_mib(row['bundle_bytes'])} "
            f"| {row['load_seconds']:.2f} "
            f"| {row['pp_tokens_per_second']:.1f} ± {row['pp_tokens_per_second_std']:.1f} "
            f"| {row['tg_tokens_per_second']:.1f} ± {row['tg_tokens_per_second_std']:.1f} "
            f"| {row['ttft_seconds'] * 1e3:.1f} "
            f"| {row['decode_latency_p50_seconds'] * 1e3:.2f} / {row['decode_latency_p95_seconds'] * 1e3:.2f} "
            f"| {row['decode_bandwidth_gb_per_second']:.2f} "
            f"| {_mib(row['peak_rss_load_bytes'])} | {_mib(row['peak_rss_generation_bytes'])} "
            f"| {_mib(row['kv_cache_bytes'])} | {row['peak_rss_over_budget']:.2f} |"
        )
    return "\n".join(lines)


def notes(report: dict[str, Any]) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        "",
        f"{settings['reps']} repetitions after {settings['warmup']} warm-up, bundles interleaved; "
        f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, onnxruntime {machine['onnxruntime']}.",
        f"Bare onnxruntime session RSS: {_mib(report['bare_session']['rss'])} MiB. "
        "RSS / budget = peak RSS during generation / (bundle bytes + KV cache + bare session RSS). "
        "Decode GB/s = tg tok/s x (weight bytes + mean KV cache bytes) read per token.",
    ]
    for ratio in report["ratios"]:
        lines.append(
            f"- {ratio['bundle']} vs {ratio['baseline']} (threads {ratio['threads']}): "
            f"tg {ratio['tg_speedup']:.2f}x, pp {ratio['pp_speedup']:.2f}x, size {ratio['size_ratio']:.3f}x, "
            f"peak RSS {ratio['peak_rss_ratio']:.2f}x"
        )
    return "\n".join(lines)


def profile_table(profile: dict[str, Any], top: int = 8) -> str:
    """Where one decode step's wall time goes: kernels by op type, onnxruntime overhead, Python overhead."""
    wall = profile["step_seconds"]
    kernels = profile["kernel_seconds_by_op"]
    kernel_total = sum(kernels.values())
    ranked = sorted(kernels.items(), key=lambda item: -item[1])
    rows = [(f"kernel {op}", seconds) for op, seconds in ranked[:top]]
    if len(ranked) > top:
        rows.append((f"kernels, {len(ranked) - top} other op types", sum(s for _, s in ranked[top:])))
    rows += [
        ("onnxruntime outside kernels", profile["run_seconds"] - kernel_total),
        ("Python: inputs, feeds, logits copy", wall - profile["run_seconds"] - profile["sampling_seconds"]),
        ("Python: sampling", profile["sampling_seconds"]),
    ]
    lines = [
        f"Decode step of {profile['name']} (threads {profile['threads']}, after a {profile['context']}-token "
        f"prefill, mean of {profile['steps']} steps, profiler on): {wall * 1e3:.2f} ms",
        "",
        "| where | ms / step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {seconds * 1e3:.3f} | {100 * seconds / wall:.1f}% |" for name, seconds in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    parts = [results_table(report), notes(report)]
    parts += ["\n" + profile_table(profile) for profile in report["profiles"]]
    return "\n".join(parts) + "\n"
