"""Engine benchmark, full-size random Phi-3-mini-4k INT4: ours vs raw onnxruntime-genai.

Usage: python scripts/bench_engine.py [--threads 2] [--repeats 3] [--out results/]

Measures in one run (each figure the median of --repeats runs):
  - raw onnxruntime-genai greedy loop (generate_next_token): prefill tok/s (128/512-token prompts),
    decode tok/s, with the thread count we set and with the builder's default config;
  - our engine with every sampling feature on (10 logit_bias ids, presence+frequency penalties,
    temperature 0.7, top_p 0.9, top_logprobs 20): the same figures; decode ratio = our overhead;
  - n=4 vs n=1 prefill and total time; cold vs cached time-to-first-token of a chat turn that
    extends a 1000-token conversation by 50 tokens; 8 requests via complete_batch vs one by one;
  - peak RSS of this process;
  - concurrency through the HTTP server (one engine thread): 8 requests sent at once vs one at
    a time (throughput ratio), and the latency of a short request alone, behind a long decode
    and behind a long prompt's prefill (what the engine's batching and turn-taking buy).
Speed does not depend on weight values, so these are real figures for Phi-3-mini.
Run one part with --sections concurrency (results merge into the existing JSON).

--sections moe: Phi-3.5-MoE at full width with 1 and 2 layers (all 32 need about 26 GB at INT4,
more than this machine has): raw onnxruntime-genai prefill and decode, split into the per-layer
and fixed (embedding, lm_head, sampling) parts and extrapolated to 32 layers (labelled so), plus
the bytes of weights a decoded token reads (attention, router, 2 of 16 experts per layer, lm_head).

--sections speed --member M: prefill and decode of full-size member M (default phi-3-small-8k),
raw onnxruntime-genai against our engine with every sampling feature on.

--sections speculative [--model DIR]: decode tok/s of our engine with speculation off and on for
(a) "copy": quote a passage of the prompt verbatim (random weights never copy by themselves, so
the answer is held to the passage's own tokens by a grammar, guided_grammar; greedy) and (b)
"never_matching": sampling at temperature 1 from random weights, with acceptance and tokens per
model call;
onnxruntime-genai's own loop with the same grammar, with and without its n-gram speculation, on
(a); and the verify cost curve: the time of one k-token append (k = 1..8) after a 128-token
prompt, from which the speedup at any acceptance rate can be read off.

--sections structured [--model DIR]: decode tok/s of our engine with every sampling feature on,
without and with a JSON schema (response_format json_schema: an array of at least 100 objects
with bounded strings, a pattern, an enum array and an integer range, so the answer cannot close
within the 64 timed tokens), on full-size Phi-3-mini-4k INT4 or the export in DIR.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from benchlib import (
    ALL_FEATURES,
    JSON_ITEM_SCHEMA,
    Server,
    bench_arguments,
    full_model,
    machine,
    median_time,
    table,
)

from phi3edge import engine, runtime
from phi3edge.benchmark import NO_END, prompt_ids, time_generation
from phi3edge.client import ChatCompletionsClient
from phi3edge.prompt import Prompt
from phi3edge.schema import SamplingConfig

DECODE_TOKENS = 64


def raw_generator(
    model: runtime.LoadedModel,
    ids: list[int],
    new_tokens: int,
    lark: str | None = None,
    ngram: bool = False,
) -> Any:
    """A generator of onnxruntime-genai's own greedy search for ``ids``, prompt not yet appended.

    Without ``lark`` it runs exactly ``new_tokens``; with it, its own llguidance holds the answer
    to that grammar. ``ngram``: with its own n-gram speculation."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model.model)
    total = len(ids) + new_tokens
    bound = {"min_length": total} if lark is None else {}
    params.set_search_options(max_length=total, batch_size=1, **bound)
    if lark is not None:
        params.set_guidance("lark_grammar", lark)
    if ngram:
        params.set_speculative_options(ngram_size=3, max_draft_tokens=4)
    return og.Generator(model.model, params)


def raw_og(
    model: runtime.LoadedModel,
    ids: list[int],
    new_tokens: int,
    lark: str | None = None,
    ngram: bool = False,
) -> tuple[float, float]:
    """onnxruntime-genai's own greedy loop (``raw_generator``): (seconds to first token, decode
    tok/s); with ``lark`` the run ends with the grammar and the rate counts what was made."""
    generator = raw_generator(model, ids, new_tokens, lark, ngram)
    started = time.perf_counter()
    generator.append_tokens(np.array([ids], dtype=np.int32))
    generator.generate_next_token()
    first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    end = time.perf_counter()
    made = len(generator.get_sequence(0)) - len(ids)
    del generator
    return first - started, (made - 1) / (end - first)


def ours(
    model: runtime.LoadedModel,
    ids: list[int],
    new_tokens: int,
    cfg: SamplingConfig = ALL_FEATURES,
    cache: engine.PrefixCache | None = None,
) -> tuple[float, float]:
    """Our engine: (seconds to first token, decode tok/s per choice)."""
    timing = time_generation(model, ids, new_tokens, cfg, cache)
    return timing.first_token_s, timing.decode_tok_s


def med(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.median([p[0] for p in pairs])), float(np.median([p[1] for p in pairs]))


def post(url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Send one chat request; (seconds until the whole answer, the answer)."""
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def concurrency(folder: Path, threads: int, engine: str, results: dict[str, float]) -> None:
    """Through ``phi3edge serve --engine ENGINE`` in its own process: batching of concurrent
    requests and turn-taking (the clients here do not share the server's interpreter). The
    figures are stored with the suffix ``_engine_ENGINE``."""
    figures: dict[str, float] = {}
    no_end = {str(k): v for k, v in NO_END.items()}
    requests = [
        {
            "messages": [{"role": "user", "content": f"Request {i}: tell me about topic {i}."}],
            "max_tokens": 32,
            "temperature": 0.7,
            "seed": i,
            "logit_bias": no_end,
        }
        for i in range(8)
    ]
    short = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 1}
    flags = ["--threads", str(threads), "--engine", engine]
    server = Server(folder, Path(tempfile.mkdtemp()) / "server.log", flags)
    url = server.url
    try:
        post(url, requests[0])  # warm-up
        started = time.perf_counter()
        for body in requests:
            post(url, body)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            list(pool.map(lambda body: post(url, body), requests))
        concurrent = time.perf_counter() - started
        figures["concurrent8_over_sequential_throughput"] = sequential / concurrent
        print(
            f"engine {engine}: 8 requests through the server: at once {concurrent:.1f} s vs "
            f"one at a time {sequential:.1f} s (throughput ratio {sequential / concurrent:.2f})",
            flush=True,
        )

        alone = float(np.median([post(url, short)[0] for _ in range(3)]))
        figures["short_alone_s"] = alone
        long_decode = {**requests[0], "max_tokens": 256}
        long_prompt = {
            "messages": [{"role": "user", "content": " ".join(f"topic{i}" for i in range(200))}],
            "max_tokens": 1,
        }
        for name, long_body in (("decode", long_decode), ("prefill", long_prompt)):
            with ThreadPoolExecutor(1) as pool:
                running_long = pool.submit(post, url, long_body)
                time.sleep(2.0)  # the long request is under way
                behind, _ = post(url, short)
                long_s, long_answer = running_long.result()
            figures[f"short_behind_long_{name}_s"] = behind
            figures[f"long_{name}_s"] = long_s
            # served one at a time, the short request would wait for the rest of the long one
            figures[f"short_behind_long_{name}_one_at_a_time_s"] = long_s - 2.0 + alone
            print(
                f"short request (1 token): alone {alone:.2f} s, behind a long {name} "
                f"({long_answer['usage']['prompt_tokens']} prompt + "
                f"{long_answer['usage']['completion_tokens']} new tokens, {long_s:.1f} s in all) "
                f"{behind:.2f} s (one request at a time: about {long_s - 2.0 + alone:.1f} s)",
                flush=True,
            )
    finally:
        server.stop()
    results.update({f"{key}_engine_{engine}": value for key, value in figures.items()})


def main() -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument(
        "--sections",
        default="all",
        choices=["all", "engine", "concurrency", "moe", "speed", "structured", "speculative"],
        help="what to run (all = engine + concurrency)",
    )
    parser.add_argument(
        "--member", default="phi-3-small-8k", help="the model of --sections speed (full size)"
    )
    parser.add_argument(
        "--engine",
        default="both",
        choices=["both", "process", "thread"],
        help="where the served model runs in the concurrency section (both: one after the other)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="an exported model for --sections structured (default: full mini)",
    )
    args = parser.parse_args()
    own_model = ("moe", "speed", "structured", "speculative")
    folder = full_model() if args.sections not in own_model else Path()
    out = args.out / "bench_engine.json"
    results: dict[str, float] = json.loads(out.read_text()) if out.exists() else {}
    if args.sections in ("all", "concurrency"):
        for engine_mode in ("process", "thread") if args.engine == "both" else (args.engine,):
            concurrency(folder, args.threads, engine_mode, results)
    if args.sections in ("all", "engine"):
        engine_sections(folder, args, results)
    if args.sections == "moe":
        moe_layer_stack(args, results)
    if args.sections == "speed":
        member_speed(args, results)
    if args.sections == "structured":
        structured_decode(args, results)
    if args.sections == "speculative":
        speculative_decode(args, results)
    print(f"machine: {machine()}")
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def engine_sections(folder: Path, args: argparse.Namespace, results: dict[str, float]) -> None:
    model = runtime.load(folder, threads=args.threads)
    r = args.repeats
    rows = []

    for length in (128, 512):
        ids = prompt_ids(length)
        raw = med([raw_og(model, ids, DECODE_TOKENS) for _ in range(r)])
        our = med([ours(model, ids, DECODE_TOKENS) for _ in range(r)])
        results[f"raw_prefill_{length}"] = length / raw[0]
        results[f"ours_prefill_{length}"] = length / our[0]
        results[f"raw_decode_{length}"] = raw[1]
        results[f"ours_decode_{length}"] = our[1]
        rows.append(
            [
                f"{length}-token prompt",
                f"{length / raw[0]:.1f}",
                f"{length / our[0]:.1f}",
                f"{raw[1]:.2f}",
                f"{our[1]:.2f}",
                f"{our[1] / raw[1]:.3f}",
            ]
        )
        print(rows[-1], flush=True)

    print(
        "\nraw onnxruntime-genai vs our engine (all sampling features on), "
        f"{args.threads} threads, tok/s"
    )
    print(
        table(
            ["prompt", "raw prefill", "our prefill", "raw decode", "our decode", "decode ours/raw"],
            rows,
        )
    )

    # n=4 vs n=1 (prefill = time to first token of all choices)
    ids = prompt_ids(64, seed=3)
    n1 = med([ours(model, ids, 16) for _ in range(r)])
    n4_cfg = SamplingConfig(**{**ALL_FEATURES.__dict__, "n": 4})
    n4_total = median_time(lambda: list(engine.generate(model, Prompt(ids, 16), n4_cfg)), r)
    n1_total = median_time(lambda: list(engine.generate(model, Prompt(ids, 16), ALL_FEATURES)), r)
    n4 = med([ours(model, ids, 16, n4_cfg) for _ in range(r)])
    results["n4_over_n1_prefill"] = n4[0] / n1[0]
    results["n4_over_n1_total"] = n4_total / n1_total
    print(
        f"\nn=4 vs n=1 (64-token prompt, 16 tokens): prefill ratio {n4[0] / n1[0]:.2f}, "
        f"total ratio {n4_total / n1_total:.2f}"
    )

    # cold vs cached time to first token: a 1000-token conversation extended by 50 tokens
    history, extension = prompt_ids(1000, seed=5), prompt_ids(50, seed=6)
    greedy = SamplingConfig(temperature=0, logit_bias=NO_END)
    cold = median_time(lambda: ours(model, history + extension, 1, greedy), r)

    def warm_then_extend() -> float:
        cache = engine.PrefixCache(1)
        ours(model, history, 1, greedy, cache)
        return ours(model, history + extension, 1, greedy, cache)[0]

    cached = float(np.median([warm_then_extend() for _ in range(r)]))
    results["ttft_cold_s"], results["ttft_cached_s"] = cold, cached
    print(f"TTFT cold {cold:.2f} s, cached {cached:.2f} s: cached/cold {cached / cold:.3f}")

    # 8 requests: complete_batch vs one by one (same total tokens)
    client = ChatCompletionsClient(folder, threads=args.threads, kv_cache_entries=0)
    requests = [
        {
            "messages": [{"role": "user", "content": f"Request {i}: tell me about topic {i}."}],
            "max_tokens": 16,
            "temperature": 0,
            "logit_bias": {str(k): v for k, v in NO_END.items()},
        }
        for i in range(8)
    ]
    sequential = median_time(lambda: [client.complete(**q) for q in requests], 1)
    batched = median_time(lambda: client.complete_batch(requests), 1)
    results["batch8_over_sequential_throughput"] = sequential / batched
    print(
        f"8 requests: complete_batch {batched:.1f} s vs sequential {sequential:.1f} s "
        f"(throughput ratio {sequential / batched:.2f})"
    )

    client.close()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    results["peak_rss_gb"] = peak_gb
    print(f"peak RSS of this process: {peak_gb:.2f} GB")


def member_speed(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Prefill and decode of another full-size member: raw onnxruntime-genai and our engine
    (every sampling feature on), 128-token prompt, 64 new tokens."""
    model = runtime.load(full_model(args.member), threads=args.threads)
    ids = prompt_ids(128)
    no_end = {i: -100.0 for i in model.eos_ids}
    cfg = SamplingConfig(**{**ALL_FEATURES.__dict__, "logit_bias": no_end})
    raw = med([raw_og(model, ids, DECODE_TOKENS) for _ in range(args.repeats)])
    our = med([ours(model, ids, DECODE_TOKENS, cfg) for _ in range(args.repeats)])
    figures = {
        f"{args.member}_raw_prefill_128": len(ids) / raw[0],
        f"{args.member}_ours_prefill_128": len(ids) / our[0],
        f"{args.member}_raw_decode": raw[1],
        f"{args.member}_ours_decode": our[1],
    }
    results.update(figures)
    for key, value in figures.items():
        print(f"{key}: {value:.2f} tok/s")


def _ours_decode(
    model: runtime.LoadedModel, ids: list[int], new_tokens: int, cfg: SamplingConfig, spec: bool
) -> tuple[float, Any]:
    """Our engine: decode tok/s after the first token (counting the tokens made), and the
    speculation counters."""
    from phi3edge.prompt import Prompt
    from phi3edge.speculation import SpeculationStats

    stats = SpeculationStats()
    made, first = 0, 0.0
    for steps in engine.generate(model, Prompt(ids, new_tokens), cfg, None, None, spec, stats):
        made += sum(step.sampled for step in steps)
        if made and not first:
            first = time.perf_counter()
    return (made - 1) / (time.perf_counter() - first), stats


def verify_cost(model: runtime.LoadedModel, ids: list[int], repeats: int) -> dict[int, float]:
    """Seconds of one k-token append after the prompt, k = 1..8 (median of ``repeats``)."""
    generator = engine._new_generator(model, len(ids) + 16, 1)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    costs = {}
    for k in range(1, 9):
        times = []
        for _ in range(repeats):
            generator.rewind_to(len(ids))
            started = time.perf_counter()
            generator.append_tokens(np.array([ids[1 : 1 + k]], dtype=np.int32))
            generator.get_output("logits")
            times.append(time.perf_counter() - started)
        costs[k] = float(np.median(times))
    return costs


COPY_PASSAGE = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step; the rest is detail and care. Measure twice, cut once, and write the tests "
    "before the code. Speed does not depend on weight values, so these figures are real ones."
)


def speculative_decode(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Speculation off and on, side by side (see the module docstring)."""
    from phi3edge.guidance import Grammar

    folder = args.model or full_model()
    model = runtime.load(folder, threads=args.threads)
    no_end = {i: -100.0 for i in model.eos_ids}
    # The answer is held to the passage's own tokens (llguidance's <[id]> lexemes), as a model
    # that copies emits them: held to its text only, random weights pick other tokenizations of
    # the same words, which no prompt-lookup draft can match (onnxruntime-genai's llguidance
    # emits the canonical ones), so the two loops would not make the same tokens.
    passage = [int(t) for t in model.tokenizer.encode(COPY_PASSAGE)]
    lark = "start: " + " ".join(f"<[{t}]>" for t in passage)
    quote = [32010, *model.tokenizer.encode("Quote exactly:"), *passage, 32007, 32001]
    grammar = Grammar.from_lark(lark, "guided_grammar")
    requests = {  # name: (prompt, config, onnxruntime-genai's grammar)
        "copy": (quote, SamplingConfig(temperature=0.0, grammar=grammar), grammar.text),
        "never_matching": (
            prompt_ids(128),
            SamplingConfig(temperature=1.0, seed=1, logit_bias=no_end),
            None,
        ),
    }
    new_tokens = 128
    print(f"model: {folder}; up to {new_tokens} new tokens, medians of {args.repeats}")
    for name, (ids, cfg, og_lark) in requests.items():
        off, on = [], []
        for _ in range(args.repeats):  # alternately, so that both see the same load
            off.append(_ours_decode(model, ids, new_tokens, cfg, False)[0])
            rate, stats = _ours_decode(model, ids, new_tokens, cfg, True)
            on.append(rate)
        figures = {
            f"spec_{name}_off": float(np.median(off)),
            f"spec_{name}_on": float(np.median(on)),
            f"spec_{name}_acceptance": stats.acceptance,
            f"spec_{name}_tokens_per_call": stats.tokens_per_call,
        }
        figures[f"spec_{name}_speedup"] = figures[f"spec_{name}_on"] / figures[f"spec_{name}_off"]
        if name == "copy":
            figures["spec_copy_og_greedy"] = float(
                med([raw_og(model, ids, new_tokens, og_lark) for _ in range(3)])[1]
            )
            figures["spec_copy_og_ngram"] = float(
                med([raw_og(model, ids, new_tokens, og_lark, ngram=True) for _ in range(3)])[1]
            )
        results.update(figures)
        print(
            f"{name}: off {figures[f'spec_{name}_off']:.2f} tok/s, on "
            f"{figures[f'spec_{name}_on']:.2f} tok/s ({figures[f'spec_{name}_speedup']:.2f}x); "
            f"acceptance {stats.acceptance:.2f}, {stats.tokens_per_call:.2f} tokens per model call"
        )
    print(
        f"copy, onnxruntime-genai's own loop and grammar: {results['spec_copy_og_greedy']:.2f} "
        f"tok/s; with its n-gram speculation: {results['spec_copy_og_ngram']:.2f} tok/s"
    )
    costs = verify_cost(model, prompt_ids(128), args.repeats)
    for k, seconds in costs.items():
        results[f"spec_verify_{k}"] = seconds
    one = costs[1]
    print("verify cost: " + ", ".join(f"k={k} {s / one:.2f}x" for k, s in costs.items()))
    print(f"  (k=1: {one * 1e3:.1f} ms)")


def structured_decode(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Our decode rate with every sampling feature on, without and with a JSON schema, measured
    alternately so that both see the same machine load."""
    from phi3edge.schema import parse_request

    folder = args.model or full_model()
    model = runtime.load(folder, threads=args.threads)
    ids = prompt_ids(128)
    no_end = {i: -100.0 for i in model.eos_ids}
    free = SamplingConfig(**{**ALL_FEATURES.__dict__, "logit_bias": no_end})
    schema = {"type": "array", "items": JSON_ITEM_SCHEMA, "minItems": 100}
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    grammar = parse_request(body).sampling().grammar
    guided = SamplingConfig(**{**ALL_FEATURES.__dict__, "grammar": grammar})
    ours(model, ids, 4, guided)  # builds llguidance's tokenizer (once per model), untimed
    pairs = [
        (ours(model, ids, DECODE_TOKENS, free), ours(model, ids, DECODE_TOKENS, guided))
        for _ in range(args.repeats)
    ]
    plain = float(np.median([p[0][1] for p in pairs]))
    schema_rate = float(np.median([p[1][1] for p in pairs]))
    figures = {
        "structured_decode_free": plain,
        "structured_decode_json_schema": schema_rate,
        "structured_decode_ratio": schema_rate / plain,
    }
    results.update(figures)
    print(f"model: {folder}")
    print(f"decode, every sampling feature on: {plain:.2f} tok/s")
    print(
        f"  with the JSON schema:            {schema_rate:.2f} tok/s ({schema_rate / plain:.3f}x)"
    )


def _decode_bytes_per_token(folder: Path) -> dict[str, float]:
    """Bytes of weights one decoded token reads in a 1-layer export, by part: the dense part of
    the layer (attention, norms, router), top-k/E of its experts, and the fixed lm_head."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    qmoe = next(n for n in model.graph.node if n.op_type == "QMoE")
    k = next(a.i for a in qmoe.attribute if a.name == "k")
    experts = next(t.dims[0] for t in model.graph.initializer if t.name.endswith(".qweight"))
    parts = {"layer_dense": 0.0, "layer_experts_active": 0.0, "lm_head": 0.0}
    for tensor in model.graph.initializer:
        size = sum(
            int(entry.value) for entry in tensor.external_data if entry.key == "length"
        ) or len(tensor.raw_data)
        if ".moe.experts." in tensor.name:
            parts["layer_experts_active"] += size * k / experts
        elif tensor.name.startswith("model.layers.0"):
            parts["layer_dense"] += size
        elif tensor.name.startswith("lm_head"):
            parts["lm_head"] += size
    return parts


def moe_layer_stack(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Full-width Phi-3.5-MoE with 1 and 2 layers: the difference is one layer's cost."""
    ids = prompt_ids(128)
    per_token = {}
    for layers in (1, 2):
        folder = full_model("phi-3.5-moe", layers=layers)
        model = runtime.load(folder, threads=args.threads)
        first_s, decode_tok_s = med([raw_og(model, ids, 32) for _ in range(args.repeats)])
        per_token[layers] = (first_s / len(ids), 1.0 / decode_tok_s)
        print(f"{layers} layer(s): prefill {len(ids) / first_s:.1f} tok/s, "
              f"decode {decode_tok_s:.2f} tok/s", flush=True)  # fmt: skip
        del model
    layer = [per_token[2][i] - per_token[1][i] for i in (0, 1)]
    fixed = [per_token[1][i] - layer[i] for i in (0, 1)]
    total = [fixed[i] + 32 * layer[i] for i in (0, 1)]
    parts = _decode_bytes_per_token(full_model("phi-3.5-moe", layers=1))
    read = parts["lm_head"] + 32 * (parts["layer_dense"] + parts["layer_experts_active"])
    figures = {
        "moe_layer_prefill_ms_per_token": layer[0] * 1e3,
        "moe_layer_decode_ms": layer[1] * 1e3,
        "moe_fixed_decode_ms": fixed[1] * 1e3,
        "moe_32_layers_prefill_tok_s_extrapolated": 1.0 / total[0],
        "moe_32_layers_decode_tok_s_extrapolated": 1.0 / total[1],
        "moe_32_layers_decode_bytes_per_token_gb": read / 1e9,
        "moe_32_layers_decode_gb_s_extrapolated": read / total[1] / 1e9,
        "moe_layer_dense_mb": parts["layer_dense"] / 1e6,
        "moe_layer_active_experts_mb": parts["layer_experts_active"] / 1e6,
    }
    results.update(figures)
    for key, value in figures.items():
        print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
