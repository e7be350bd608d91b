"""Command line: ``phi3edge demo | export | adapter add/remove | data check | random-checkpoint |
info | chat | serve | batch | bench``.

Every command prints progress to stderr and results to stdout; bad input ends with a one-line
``error: ...`` and exit status 2 (1 for a failure while working).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEMO_PROMPT = "Write a haiku about running language models on a laptop."


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where built-in random models are kept (PHI3EDGE_CACHE or ~/.cache/phi3edge)."""
    return Path(os.environ.get("PHI3EDGE_CACHE", Path.home() / ".cache" / "phi3edge"))


def tiny_demo_model(precision: str = "int4") -> Path:
    """Build (once) the built-in tiny random-weight Phi-3-mini-4k and its export."""
    from phi3edge import export, fixtures

    root = cache_dir() / "demo"
    checkpoint = root / "tiny-phi-3-mini-4k-random"
    exported = root / f"tiny-phi-3-mini-4k-random-{precision}"
    if not (checkpoint / "config.json").exists():
        _progress(f"building a tiny random-weight Phi-3-mini-4k checkpoint in {checkpoint}")
        fixtures.write_random_checkpoint("phi-3-mini-4k", checkpoint, size="tiny")
    if not (exported / export.MANIFEST).exists():
        export.export(checkpoint, exported, precision=precision, progress=_progress)
    return exported


def cmd_demo(args: argparse.Namespace) -> int:
    from phi3edge.client import ChatCompletionsClient, UserMessage

    model_dir = Path(args.model) if args.model else tiny_demo_model()
    if not args.model:
        _progress(
            "NOTE: this model has random weights (real ones cannot be downloaded here), "
            "so the text below is noise; the request path is the real one."
        )
    client = ChatCompletionsClient(model_dir, threads=args.threads)
    response = client.complete(
        messages=[UserMessage(args.prompt)], max_tokens=args.max_tokens, temperature=0.7, seed=7
    )
    print(json.dumps(response.as_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from phi3edge.export import ExportError, Int4Options, export

    given = {
        "block_size": args.block_size,
        "accuracy_level": args.accuracy_level,
        "lm_head": args.lm_head,
        "embeddings": args.embeddings,
        "method": args.quant_method,
        "symmetric": False if args.asymmetric else None,
        "int8_matmuls": tuple(args.int8_matmul) or None,
        "int8_layers": args.int8_layers,
    }
    given = {name: value for name, value in given.items() if value is not None}
    if given and args.precision != "int4":
        raise ExportError(f"INT4 layout options apply to --precision int4, not {args.precision}")
    # None: the member's recommended layout; any option: a layout from those, plain otherwise
    int4 = Int4Options(**given) if given else None
    export(
        args.source,
        args.out,
        precision=args.precision,
        int4=int4,
        progress=_progress,
        moe_experts=args.moe_experts,
        adapters=[_adapter_pair(a) for a in args.adapter],
    )
    return 0


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--adapter takes NAME=PEFT_DIR, not {text!r}")
    return name, folder


def cmd_adapter_remove(args: argparse.Namespace) -> int:
    from phi3edge import adapters

    adapters.remove(args.model, args.name)
    _progress(f"removed adapter '{args.name}' from {args.model}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from phi3edge import data_check

    count, context = None, None
    if args.model:
        from phi3edge.export import Manifest

        context = Manifest.read(args.model).context_length
        _progress(f"loading the tokenizer and chat template of {args.model}")
        count = data_check.token_counter(args.model)
    report = data_check.check_file(args.file, count, context, progress=_progress)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def cmd_adapter_add(args: argparse.Namespace) -> int:
    from phi3edge import adapters

    entry = adapters.add(args.model, args.name, args.peft_dir, progress=_progress)
    print(json.dumps({args.name: entry}, indent=2))
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from phi3edge.fixtures import write_random_checkpoint

    _progress(f"writing a {args.size} random-weight {args.arch} checkpoint to {args.out}")
    path = write_random_checkpoint(
        args.arch, args.out, size=args.size, seed=args.seed, layers=args.layers
    )
    print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from phi3edge import catalog

    if args.catalog or not args.model:
        print(catalog.describe())
        return 0
    from phi3edge.export import Manifest

    manifest = Manifest.read(args.model)
    print(json.dumps(manifest.__dict__, indent=2))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from phi3edge.client import ChatCompletionsClient

    client = ChatCompletionsClient(args.model, threads=args.threads)
    history: list[dict[str, str]] = []
    _progress("type a message; an empty line ends the chat")
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line})
        reply = []
        for update in client.complete(messages=history, stream=True, max_tokens=args.max_tokens):
            for choice in update.choices:
                if choice.delta.content:
                    reply.append(choice.delta.content)
                    print(choice.delta.content, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(args: argparse.Namespace) -> int:
    from phi3edge import runtime
    from phi3edge.benchmark import NO_END, prompt_ids, time_generation
    from phi3edge.schema import SamplingConfig

    model_dir = Path(args.model) if args.model else tiny_demo_model()
    model = runtime.load(model_dir, threads=args.threads)
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, seed=0, logit_bias=NO_END)
    ids = prompt_ids(args.prompt_tokens)
    time_generation(model, ids[:16], 2, cfg)  # warm-up
    _progress(
        f"{model.name}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"{model.threads} threads, median of {args.repeats}"
    )
    runs = sorted(
        (time_generation(model, ids, args.new_tokens, cfg) for _ in range(args.repeats)),
        key=lambda t: t.first_token_s,
    )
    median = runs[len(runs) // 2]
    print(
        json.dumps(
            {
                "model": model.name,
                "threads": model.threads,
                "time_to_first_token_s": round(median.first_token_s, 3),
                "prefill_tokens_per_s": round(median.prefill_tok_s, 2),
                "decode_tokens_per_s": round(
                    sorted(r.decode_tok_s for r in runs)[len(runs) // 2], 2
                ),
            },
            indent=2,
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from phi3edge.server import ServerSettings, serve

    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("PHI3EDGE_API_KEY"),
        max_body_bytes=args.max_body_bytes,
        cors_origins=tuple(args.cors_origin),
        allowed_hosts=tuple(args.allowed_host),
    )
    process = args.engine == "process"
    serve(
        args.model,
        settings,
        threads=args.threads,
        limits=_limits(args),
        engine_process=process,
        speculative=args.speculative,
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """A Batch API JSONL file in, its output JSONL out; a rerun resumes where the last one
    stopped (the custom_ids already in the output are skipped)."""
    from phi3edge import batch
    from phi3edge.batch_file import OutputFile

    # duplicates and mixed models: refused before anything runs
    scanned = batch.scan(batch.read_file(args.input), batch.served_adapters(args.model))
    # nonsense values: refused here
    limits = batch.job_limits(args.window, args.batch_prefill_tokens, args.batch_padding)
    with OutputFile(args.output) as out:
        if out.truncated_bytes:
            _progress(
                f"cut off a partial last line ({out.truncated_bytes} bytes) that an interrupted "
                f"run left in {args.output}; that request runs again"
            )
        done = len(out.done_ids & scanned.ids.keys()) + len(out.done_lines)
        stray = len(out.done_ids - scanned.ids.keys())
        if stray:
            _progress(f"note: {stray} lines of {args.output} answer custom_ids not in {args.input}")
        remaining = scanned.lines - done
        if done:
            _progress(f"resuming: {done} of {scanned.lines} requests already in {args.output}")
        if scanned.model:
            _progress(f"the file asks for model {scanned.model!r}; {args.model} answers it")
        if remaining <= 0:
            _progress(f"nothing to do: every request of {args.input} is answered")
            return 0
        if args.ray is not None:
            from phi3edge import batch_ray

            results = batch_ray.run(
                args.model,
                args.input,
                address=None if args.ray == "local" else args.ray,
                actors=args.actors,
                cpus_per_actor=args.cpus_per_actor,
                skip_ids=out.done_ids,
                skip_lines=out.done_lines,
                extra_parameters=args.extra_parameters,
                window=args.window,
                prefill_tokens=args.batch_prefill_tokens,
                padding_pct=args.batch_padding,
            )
        else:
            results = batch.run(
                args.model,
                batch.read_file(args.input),
                skip_ids=out.done_ids,
                skip_lines=out.done_lines,
                extra_parameters=args.extra_parameters,
                threads=args.threads,
                window=args.window,
                limits=limits,
            )
        return _write_results(results, out, remaining)


def _write_results(results: Iterator[dict[str, Any]], out: Any, total: int) -> int:
    """Append every result as it comes, with a progress bar; Ctrl-C stops between lines."""
    from tqdm import tqdm

    from phi3edge.batch import completion_tokens

    written = errors = tokens = 0
    started = time.monotonic()
    bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
    guard = _CtrlC()
    try:
        for output in results:
            with guard.writing():
                out.append(output)
            written += 1
            errors += output["error"] is not None or output["response"]["status_code"] != 200
            tokens += completion_tokens(output)
            rate = tokens / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{rate:.1f} tok/s, {errors} errors", refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        results.close()  # abandons the requests in flight; they run again on the next run
        bar.close()
        _progress(
            f"interrupted: {written} requests written to {out.path} ({out.lines} lines in all); "
            "run the same command again to continue"
        )
        return 130
    finally:
        guard.restore()
        bar.close()
    elapsed = time.monotonic() - started
    _progress(
        f"{written} requests answered ({errors} errors) in {elapsed:.1f} s: "
        f"{written / elapsed:.2f} requests/s, {tokens / elapsed:.1f} tokens/s; output: {out.path}"
    )
    return 0


class _CtrlC:
    """Ctrl-C stops a batch job between lines, never in the middle of writing one."""

    def __init__(self) -> None:
        self.pressed = False
        self._writing = False
        self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.pressed = True
        if not self._writing:
            raise KeyboardInterrupt

    @contextmanager
    def writing(self) -> Iterator[None]:
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self.pressed:
            raise KeyboardInterrupt

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._old)


BATCH_PADDING_HELP = (
    "the most a batch may waste on padding to its longest prompt and on steps after a row's "
    "max_tokens, in percent of its real work; 'none': no cap"
)


def _count_or_none(text: str) -> int | None:
    """An integer flag value, or 'none' (no limit); the limits themselves check the range."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', not {text!r}") from None


_LIMIT_FLAGS = [  # (flag, field of phi3edge.limits.Limits, help)
    (
        "--max-tokens-limit",
        "max_tokens",
        "largest max_tokens a request may ask; also the default when it gives none",
    ),
    ("--max-output-tokens", "max_output_tokens", "n x max_tokens of one request"),
    ("--max-prompt-tokens", "max_prompt_tokens", "longest prompt accepted"),
    ("--max-n", "max_n", "largest n"),
    ("--max-queue", "max_queue", "requests running or waiting; more are answered 429"),
    ("--max-active-batches", "max_active_batches", "batches that take turns on the model"),
    (
        "--batch-prefill-tokens",
        "batch_prefill_tokens",
        "padded prompt tokens (rows x longest prompt) of one batched prefill, which nothing "
        "interrupts; longer prompts run alone",
    ),
    ("--batch-padding", "batch_padding_pct", BATCH_PADDING_HELP),
]
# What the limits that may be None mean then.
_NONE_SHOWN = {"max_prompt_tokens": "the model's context", "batch_padding_pct": "no cap"}


def _limits(args: argparse.Namespace) -> Any:
    from phi3edge.limits import Limits

    chosen = {name: getattr(args, name) for _, name, _ in _LIMIT_FLAGS}
    return Limits(**chosen, time_budget_s=args.time_budget or None)


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The operator's limits (``phi3edge.limits.Limits``); defaults in the help text."""
    from phi3edge.limits import Limits

    defaults = Limits()
    group = parser.add_argument_group("limits")
    for flag, name, text in _LIMIT_FLAGS:
        default = getattr(defaults, name)
        shown = _NONE_SHOWN[name] if default is None else "%(default)s"
        kind = _count_or_none if name in _NONE_SHOWN else int
        group.add_argument(flag, dest=name, type=kind, default=default, help=f"{text} ({shown})")
    group.add_argument(
        "--time-budget",
        type=float,
        default=600.0,
        help="seconds a request may take, waiting included; then its choices end with "
        "finish_reason length (0 = no limit; default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3edge", description="Run Phi-3 / Phi-3.5 models locally (INT4 ONNX, CPU)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="export the built-in tiny random model and answer one chat")
    demo.add_argument("--model", help="an exported model folder instead of the tiny random one")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--threads", type=int, default=None)
    demo.set_defaults(func=cmd_demo)

    exp = sub.add_parser(
        "export",
        help="Hugging Face checkpoint -> INT4/fp32 ONNX folder",
        description="Without INT4 layout options, Phi-3-mini, Phi-3-medium and Phi-3.5-mini get "
        "the recommended layout: k_quant_mixed at block 128 with o_proj at int8 in the layers "
        "k_quant_mixed upgrades "
        "(Phi-3-small and Phi-3.5-MoE: rtn at block 32). Any layout option describes the "
        "layout instead, each option not given taking its plain value (rtn, block 32, accuracy "
        "level 4, int4 lm_head, fp32 embeddings, no int8 MatMuls).",
    )
    exp.add_argument("source", help="checkpoint folder or hub id (owner/name)")
    exp.add_argument("out", help="output folder (must not exist or be empty)")
    exp.add_argument("--precision", choices=["int4", "fp32"], default="int4")
    exp.add_argument("--block-size", type=int, help="INT4 quantization block size (plain: 32)")
    exp.add_argument(
        "--accuracy-level",
        type=int,
        help="INT4 MatMul activations: 4 int8 (plain; fastest on CPU), 1 fp32",
    )
    exp.add_argument("--lm-head", choices=["int4", "int8", "fp32"], help="plain: int4")
    exp.add_argument("--embeddings", choices=["fp32", "int4"], help="plain: fp32")
    exp.add_argument(
        "--quant-method",
        choices=["rtn", "k_quant", "k_quant_last", "k_quant_mixed"],
        help="how INT4 blocks are rounded: rtn (round to nearest), k_quant (llama.cpp's k-quant "
        "search for each block's scale and minimum), k_quant_last (also an int8 lm_head), "
        "k_quant_mixed (also int8 for the lm_head and the MatMuls llama.cpp's Q4_K_M keeps "
        "at higher precision); plain: rtn",
    )
    exp.add_argument(
        "--int8-matmul",
        action="append",
        default=[],
        choices=["qkv_proj", "o_proj", "down_proj"],
        help="keep this MatMul at int8 in every layer, or in those --int8-layers names (repeat "
        "for more; k_quant methods only; Phi-3-mini, Phi-3-medium, Phi-3.5-mini)",
    )
    exp.add_argument(
        "--int8-layers",
        choices=["all", "mixed", "others"],
        help="the layers whose --int8-matmul MatMuls go int8: all (the default), mixed (those "
        "llama.cpp's Q4_K_M keeps at higher precision: the first and last eighth and every third "
        "between) or others (the rest)",
    )
    exp.add_argument(
        "--asymmetric",
        action="store_true",
        help="rtn blocks with a zero point (uint4) instead of symmetric int4; "
        "the k_quant methods are asymmetric anyway",
    )
    exp.add_argument(
        "--moe-experts",
        choices=["int4", "int8"],
        help="Phi-3.5-MoE experts (default int4; int8 with --precision fp32): int8 is more exact",
    )
    exp.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PEFT_DIR",
        help="add a PEFT LoRA fine-tune, served as model NAME (repeatable)",
    )
    exp.set_defaults(func=cmd_export)

    adapter = sub.add_parser("adapter", help="LoRA fine-tunes of an exported model")
    adapter_sub = adapter.add_subparsers(dest="adapter_command", required=True)
    add = adapter_sub.add_parser(
        "add",
        help="add a PEFT LoRA adapter folder to an export; requests then select it by name",
    )
    add.add_argument("model", help="an exported model folder")
    add.add_argument("name", help="the name requests give as `model`")
    add.add_argument("peft_dir", help="PEFT save_pretrained folder (adapter_config.json + weights)")
    add.set_defaults(func=cmd_adapter_add)
    remove = adapter_sub.add_parser("remove", help="remove an adapter from an export")
    remove.add_argument("model", help="an exported model folder")
    remove.add_argument("name", help="the adapter's name")
    remove.set_defaults(func=cmd_adapter_remove)

    data = sub.add_parser("data", help="fine-tuning data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check",
        help="check a chat fine-tuning JSONL file (exit 1 when a line breaks a rule)",
        description='Each line must be {"messages": [...]}: an optional system message, then '
        "user and assistant turns alternating from user, ending with the assistant's answer, "
        "every content non-empty text. Errors are printed as FILE:LINE: error: ... With "
        "--model, each example's tokens are counted with the model's own tokenizer and chat "
        "template, and examples longer than its context are errors.",
    )
    check.add_argument("file", help="the JSONL file")
    check.add_argument("--model", help="an exported model folder: count tokens with it")
    check.set_defaults(func=cmd_data_check)

    rnd = sub.add_parser("random-checkpoint", help="write a random-weight Phi-3 checkpoint")
    rnd.add_argument("arch", help="catalog id, e.g. phi-3-mini-4k (see `phi3edge info --catalog`)")
    rnd.add_argument("out")
    rnd.add_argument("--size", choices=["tiny", "full"], default="tiny")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument(
        "--layers", type=int, help="fewer layers than the member has (per-layer benchmarks)"
    )
    rnd.set_defaults(func=cmd_random_checkpoint)

    info = sub.add_parser("info", help="the family catalog, or an exported model's manifest")
    info.add_argument("model", nargs="?")
    info.add_argument("--catalog", action="store_true")
    info.set_defaults(func=cmd_info)

    chat = sub.add_parser("chat", help="interactive chat with an exported model")
    chat.add_argument("model")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--threads", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="time to first token, prefill and decode speed")
    bench.add_argument("model", nargs="?", help="exported model folder (default: the tiny demo)")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=None)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="serve the chat-completions API over HTTP")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--api-key", default=None, help="require this key (or PHI3EDGE_API_KEY)")
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument(
        "--engine",
        choices=["process", "thread"],
        default="process",
        help="run the model in a child process (default: the server never waits for the GIL "
        "that onnxruntime-genai holds while it computes) or in a thread of the server",
    )
    serve.add_argument(
        "--no-speculative",
        dest="speculative",
        action="store_false",
        help="turn off prompt-lookup speculative decoding (on by default for requests that run "
        "alone: the same tokens, fewer model calls when answers repeat the prompt)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body (default %(default)s)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN (repeatable; default: none)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="accept requests whose Host header names HOST, besides localhost and --host "
        "(repeatable; '*' accepts any; default: none)",
    )
    _add_limit_flags(serve)
    serve.set_defaults(func=cmd_serve)

    bat = sub.add_parser(
        "batch",
        help="answer a Batch API JSONL file (OpenAI / Azure OpenAI format) into an output JSONL",
        description="Answer every request of INPUT (the OpenAI / Azure OpenAI Batch API input "
        "format: custom_id, method, url, body per line) and append the results to OUTPUT in the "
        "Batch API output format. Rerunning the same command skips the custom_ids already in "
        "OUTPUT; Ctrl-C stops cleanly (exit status 130).",
    )
    bat.add_argument("model", help="exported model folder")
    bat.add_argument("input", help="Batch API input file (JSONL)")
    bat.add_argument("-o", "--output", required=True, help="output file (JSONL), appended to")
    bat.add_argument("--threads", type=int, default=None)
    bat.add_argument(
        "--window",
        type=int,
        default=64,
        help="requests in flight at once; the engine batches them, the most alike lengths "
        "together (default %(default)s)",
    )
    bat.add_argument(
        "--batch-prefill-tokens",
        type=int,
        default=1024,
        help="padded prompt tokens (rows x longest prompt) of one batched prefill; longer "
        "prompts run alone (default %(default)s)",
    )
    bat.add_argument(
        "--batch-padding",
        type=_count_or_none,
        default=10,
        metavar="PCT",
        help=f"{BATCH_PADDING_HELP} (default %(default)s)",
    )
    bat.add_argument(
        "--extra-parameters",
        choices=["error", "drop", "pass-through"],
        default=None,
        help="for /chat/completions lines: what the Azure route's extra-parameters header "
        "would say (default: error, as without the header)",
    )
    bat.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (ADDRESS as for ray.init, e.g. auto or ray://HOST:10001; "
        "without one: a local Ray instance); needs the [ray] extra",
    )
    bat.add_argument(
        "--actors", type=int, default=2, help="with --ray: model copies (default %(default)s)"
    )
    bat.add_argument(
        "--cpus-per-actor",
        type=int,
        default=1,
        help="with --ray: CPUs (and ONNX Runtime threads) per model copy (default %(default)s)",
    )
    bat.set_defaults(func=cmd_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from phi3edge.catalog import UnknownModelError
    from phi3edge.errors import ApiError
    from phi3edge.export import ExportError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (
        ExportError,
        UnknownModelError,
        FileExistsError,
        FileNotFoundError,
        ValueError,  # also a batch file that cannot run (duplicate custom_ids, ...)
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"error: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
