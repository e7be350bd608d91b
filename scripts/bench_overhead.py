"""Our per-token overhead against raw onnxruntime-genai where a model step is short (#12 part 3).

Usage: python scripts/bench_overhead.py [--threads 2] [--repeats 3] [--new 256] [--out results/]
                                        [--burst 16] [--bare] [--against PYTHON --processes 3]

On the mid-size random Phi-3-mini (hidden 1024, 8 layers, V = 32064; ``benchlib.mid_model``,
built once and cached), 128-token prompt, ``--new`` new tokens:
  - raw onnxruntime-genai's greedy ``generate_next_token`` loop;
  - our engine (``engine.generate``) with every sampling feature on (10 logit_bias ids, presence +
    frequency penalties, temperature 0.7, top_p 0.9, top_logprobs 20), with none (greedy, which
    onnxruntime-genai's own search picks), and greedy with the end tokens banned by logit_bias
    (through our kernel);
  - raw and ours decode side by side, ``--burst`` tokens of one, then ``--burst`` of the other
    (each on its own generator), so that a slow spell of a shared VM falls on both alike (on the
    VMs here the raw rate moved by up to 20% from one run of a few seconds to the next, more
    than the difference measured). Per run and configuration: our rate over raw's and our extra
    time per token; the medians over ``--repeats`` runs.
Then one traced run of each configuration splits a step into the call that runs the model,
onnxruntime-genai's other calls, our sampling kernel and the rest of our loop, and
``logits_reads`` times what reading the logits into Python costs right after a model call.
``--bare`` also measures the bare loop (``bare_loop``), side by side with raw in the same way:
the floor of any loop that samples with our kernel through onnxruntime-genai's Python API.

``--against PYTHON``: the same measurement with another installed phi3edge (an older commit
installed into its own virtualenv), in ``--processes`` child processes per side started
alternately, so that both see the same drift of a shared machine. It only uses interfaces both
have (``runtime.load``, ``engine.generate``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import raw_generator, raw_og  # noqa: E402
from benchlib import ALL_FEATURES, bench_arguments, machine, mid_model, table  # noqa: E402

import phi3edge  # noqa: E402
from phi3edge import _sampling, engine, runtime  # noqa: E402
from phi3edge.benchmark import NO_END, prompt_ids  # noqa: E402
from phi3edge.prompt import Prompt  # noqa: E402
from phi3edge.schema import SamplingConfig  # noqa: E402

CONFIGS = {
    "every feature": ALL_FEATURES,
    # plain greedy: onnxruntime-genai's own search picks (engine.search_can_pick); the prompt's
    # greedy answer has no end token within --new, which side_by_side checks
    "none": SamplingConfig(temperature=0),
    # greedy through our kernel: what "none" measured until 2026-12-07 (the end tokens banned)
    "greedy, logit_bias": SamplingConfig(temperature=0, logit_bias=NO_END),
}


Steps = Iterator[Any]  # one item per unit of work: [] for a prefill chunk, else a token's step


def bare_loop(model: runtime.LoadedModel, prompt: Prompt, cfg: SamplingConfig) -> Steps:
    """The least a loop with our own sampler does per token through onnxruntime-genai's Python
    API: ``append_tokens`` of the chosen token, ``get_output("logits")``, our kernel; no text, no
    logprob objects, no halt checks. What the engine's rate would be if its Python cost nothing."""
    ids, new, vocab = prompt.ids, prompt.max_new_tokens, model.vocab_size
    generator = engine._new_generator(model, len(ids) + new, 1)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    params, state = engine.sampler_params(cfg, vocab), _sampling.RowState(vocab, cfg.seed, 0)
    logits = generator.get_logits()
    for made in range(1, new + 1):
        step = _sampling.sample(logits[:, 0], [params], [state], None)
        yield [step]
        if made < new:
            generator.append_tokens(np.array([[int(step.tokens[0])]], dtype=np.int32))
            logits = generator.get_output("logits")


LOOPS: dict[str, Callable[[runtime.LoadedModel, Prompt, SamplingConfig], Steps]] = {
    "": engine.generate,
    "bare loop, ": bare_loop,
}


def side_by_side(
    model: runtime.LoadedModel, ids: list[int], new: int, ours: Steps, burst: int
) -> tuple[float, float]:
    """Decode seconds per token of raw onnxruntime-genai and of ``ours`` (the steps of a request
    for ``ids`` and ``new`` tokens), the two decoding in turns of ``burst`` tokens (prefills and
    first tokens untimed)."""
    raw = raw_generator(model, ids, new)
    raw.append_tokens(np.array([ids], dtype=np.int32))
    raw.generate_next_token()
    while not next(ours):  # prefill chunks yield [], the first token a step
        pass
    raw_s = ours_s = 0.0
    left = new - 1
    while left > 0:
        turn = min(burst, left)
        started = time.perf_counter()
        for _ in range(turn):
            raw.generate_next_token()
        switched = time.perf_counter()
        for _ in range(turn):
            if next(ours, None) is None:
                raise RuntimeError("ours ended early (an end token?): raw makes exactly --new")
        raw_s, ours_s = raw_s + switched - started, ours_s + time.perf_counter() - switched
        left -= turn
    if next(ours, None) is not None or not raw.is_done():
        raise RuntimeError("raw and ours did not make the same number of tokens")
    return raw_s / (new - 1), ours_s / (new - 1)


def rates(
    model: runtime.LoadedModel, ids: list[int], new: int, repeats: int, burst: int, bare: bool
) -> dict[str, list[list[float]]]:
    """Per configuration (and per loop: the engine's, and with ``bare`` the bare loop's),
    ``repeats`` pairs [raw tok/s, ours tok/s], each measured side by side."""
    raw_og(model, ids, 8)  # warm up
    loops = LOOPS if bare else {"": engine.generate}
    out: dict[str, list[list[float]]] = {}
    for _ in range(repeats):
        for loop, steps in loops.items():
            for name, cfg in CONFIGS.items():
                ours = steps(model, Prompt(ids, new), cfg)
                raw_s, ours_s = side_by_side(model, ids, new, ours, burst)
                out.setdefault(loop + name, []).append([1 / raw_s, 1 / ours_s])
    return out


class _Traced:
    """A generator whose onnxruntime-genai calls are timed by name (seconds in ``spent``)."""

    def __init__(self, generator: Any, spent: dict[str, float]) -> None:
        self._generator, self._spent = generator, spent

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._generator, name)

        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args)
            finally:
                self._spent[name] = self._spent.get(name, 0.0) + time.perf_counter() - started

        return timed


def traced_step(
    model: runtime.LoadedModel, ids: list[int], new: int, cfg: SamplingConfig
) -> dict[str, float]:
    """Milliseconds per decode step of one run of our engine, by part: the call that runs the
    model, onnxruntime-genai's other calls, our kernel and the rest of our loop."""
    spent: dict[str, float] = {}
    make, kernel = engine._new_generator, engine._sampling.sample

    def sample(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return kernel(*args)
        finally:
            spent["kernel"] = spent.get("kernel", 0.0) + time.perf_counter() - started

    engine._new_generator = lambda *a, **k: _Traced(make(*a, **k), spent)  # type: ignore[assignment]
    engine._sampling.sample = sample  # type: ignore[assignment]
    try:
        first, at_first = 0.0, {}
        for steps in engine.generate(model, Prompt(ids, new), cfg):
            if steps and not first:
                first, at_first = time.perf_counter(), dict(spent)
        end = time.perf_counter()
    finally:
        engine._new_generator, engine._sampling.sample = make, kernel  # type: ignore[assignment]
    per_step = {k: (v - at_first.get(k, 0.0)) / (new - 1) * 1e3 for k, v in spent.items()}
    # the call that runs the model takes the most time: append_tokens when our kernel picks,
    # generate_next_token when onnxruntime-genai's search does
    runs_model = max(("append_tokens", "generate_next_token"), key=lambda k: per_step.get(k, 0.0))
    parts = {
        "model_call_ms": per_step.pop(runs_model, 0.0),
        "kernel_ms": per_step.pop("kernel", 0.0),
        "other_og_calls_ms": sum(per_step.values()),
    }
    parts["rest_of_loop_ms"] = (end - first) / (new - 1) * 1e3 - sum(parts.values())
    return parts


READ_STEPS = 99  # decode steps that logits_reads times


def logits_reads(model: runtime.LoadedModel, ids: list[int]) -> dict[str, float]:
    """Milliseconds, medians over ``READ_STEPS`` decode steps: the first ``get_output("logits")``
    after a model call, a second read of the same logits, and a numpy copy of the array read.

    The first read is what a loop that samples with its own kernel pays per token on top of raw
    onnxruntime-genai's (whose search reads the logits in place); the second and the copy show
    how much of it is the copy itself."""
    generator = engine._new_generator(model, len(ids) + READ_STEPS + 1, 1)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    times: dict[str, list[float]] = {"first_read_ms": [], "second_read_ms": [], "copy_ms": []}
    token = np.array([[ids[-1]]], dtype=np.int32)
    for _ in range(READ_STEPS):
        generator.append_tokens(token)
        started = time.perf_counter()
        logits = generator.get_output("logits")
        first = time.perf_counter()
        generator.get_output("logits")
        second = time.perf_counter()
        logits.copy()
        copied = time.perf_counter()
        times["first_read_ms"].append(first - started)
        times["second_read_ms"].append(second - first)
        times["copy_ms"].append(copied - second)
    return {name: float(np.median(values)) * 1e3 for name, values in times.items()}


def summary(runs: dict[str, list[list[float]]]) -> dict[str, dict[str, float]]:
    """Per configuration: median raw and ours tok/s, median and range of the per-run ratio, and
    the median extra milliseconds per token."""
    out = {}
    for name, pairs in runs.items():
        raw, ours = np.array(pairs).T
        ratios = ours / raw
        out[name] = {
            "raw_tok_s": float(np.median(raw)),
            "tok_s": float(np.median(ours)),
            "ratio": float(np.median(ratios)),
            "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()),
            "extra_ms_per_token": float(np.median(1e3 / ours - 1e3 / raw)),
        }
    return out


def main() -> None:
    parser = bench_arguments(__doc__ or "")
    parser.add_argument("--new", type=int, default=256, help="new tokens per run")
    parser.add_argument("--against", help="another Python with another phi3edge installed")
    parser.add_argument("--processes", type=int, default=3, help="child processes per side")
    parser.add_argument(
        "--burst", type=int, default=16, help="tokens per turn when raw and ours alternate"
    )
    parser.add_argument(
        "--bare", action="store_true", help="also time the bare loop (no text, no logprob objects)"
    )
    parser.add_argument("--rounds-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _, folder = mid_model()
    if args.rounds_json:  # a child of --against: rounds only, as JSON
        model = runtime.load(folder, threads=args.threads)
        print(
            json.dumps(rates(model, prompt_ids(128), args.new, args.repeats, args.burst, args.bare))
        )
        return
    if args.against:
        compare(args)
        return
    model = runtime.load(folder, threads=args.threads)
    ids = prompt_ids(128)
    result = summary(rates(model, ids, args.new, args.repeats, args.burst, args.bare))
    for name, cfg in CONFIGS.items():
        result[name].update(traced_step(model, ids, args.new, cfg))
    parts = ("model_call_ms", "other_og_calls_ms", "kernel_ms", "rest_of_loop_ms")
    rows = [
        [
            f"ours, {name}",
            f"{r['raw_tok_s']:.1f} / {r['tok_s']:.1f}",
            f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            f"{r['extra_ms_per_token']:.3f}",
        ]
        + [f"{r[k]:.3f}" if k in r else "" for k in parts]  # the bare loop is not traced
        for name, r in result.items()
    ]
    print(
        f"\nmid-size random Phi-3-mini INT4 ({folder.name}), 128-token prompt, {args.new} new "
        f"tokens, {args.threads} threads, raw and ours in turns of {args.burst} tokens, medians "
        f"of {args.repeats} runs; "
        f"per-step parts from one traced run; {machine()}"
    )
    headers = ["decode", "tok/s raw / ours", "ours/raw (range)", "extra ms/token", "model call ms"]
    headers += ["other og ms", "kernel ms", "rest ms"]
    print(table(headers, rows))
    reads = logits_reads(model, ids)
    print(
        f"reading the logits after a model call: first get_output {reads['first_read_ms']:.3f} "
        f"ms, a second read {reads['second_read_ms']:.3f} ms, a numpy copy of them "
        f"{reads['copy_ms']:.3f} ms (medians of {READ_STEPS} steps)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    output = {**result, "logits_reads": reads}
    (args.out / "bench_overhead.json").write_text(json.dumps(output, indent=2))


def compare(args: Any) -> None:
    """This phi3edge against the one ``args.against`` runs, in alternating child processes."""
    outside = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    here = str(Path(phi3edge.__file__).resolve().parents[1])  # this phi3edge, wherever it is
    sides = {
        "this": (sys.executable, {**outside, "PYTHONPATH": here}),
        "against": (args.against, outside),  # its own installed phi3edge
    }
    runs: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    for _ in range(args.processes):
        for side, (python, env) in sides.items():
            command = [python, __file__, "--rounds-json", "--threads", str(args.threads)]
            command += ["--repeats", str(args.repeats), "--new", str(args.new)]
            command += ["--burst", str(args.burst)] + (["--bare"] if args.bare else [])
            out = subprocess.run(
                command, check=True, capture_output=True, text=True, env=env
            ).stdout
            for name, values in json.loads(out.splitlines()[-1]).items():
                runs[side].setdefault(name, []).extend(values)
    result = {side: summary(r) for side, r in runs.items()}
    rows = [
        [
            side,
            name,
            f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            f"{r['extra_ms_per_token']:.3f}",
        ]
        for side, by_name in result.items()
        for name, r in by_name.items()
    ]
    print(
        f"\n{args.processes} processes per side x {args.repeats} runs, mid-size model, "
        f"{args.new} new tokens; this = {sys.executable}, against = {args.against}; {machine()}"
    )
    print(table(["phi3edge", "sampling", "ours/raw (range)", "extra ms/token"], rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_overhead_compare.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
