"""Fuzz the HTTP server against its own OpenAPI document with schemathesis, within a time budget.

Starts ``phi3edge serve`` (the installed CLI, a free loopback port, one thread) on the built-in
tiny random-weight model (or ``--model DIR``), then runs ``schemathesis run`` against
``/openapi.json`` with schemathesis' positive and negative data generation.

Checks (default): ``not_a_server_error`` (no 5xx), ``status_code_conformance`` (every status is
documented for the operation), ``content_type_conformance``, ``response_headers_conformance``
(``x-ms-error-code`` on errors, ``Retry-After`` on 429) and ``response_schema_conformance``
(JSON bodies, and every server-sent event of a stream, against the documented schemas).
``--checks all`` adds schemathesis' stricter ones, e.g. ``negative_data_rejection`` (the server
must refuse what the schema forbids) and ``positive_data_acceptance``.
Besides schemathesis' verdict the server's log is scanned: an ``ERROR`` line (an unhandled
exception, also one that ended a stream after its 200) fails the run.

Speed: every chat request is limited to ``--max-tokens`` generated tokens (default 16) by the
hook in scripts/fuzz_hooks.py, which lowers ``max_tokens`` / ``max_completion_tokens`` when they
are valid and fit the context, and adds ``max_tokens`` when a body has neither. Bounding the
value in the schema instead would make schemathesis' negative phase expect larger values to be
refused. With the defaults (``--max-time 90``, ``--max-examples 100``) a run takes about two
minutes here; ``--max-time`` bounds schemathesis, and the whole run is killed after
``--max-time`` + 120 s.

Exit status: 0 when everything passed, 1 on any failure (summary printed), 2 on bad usage.
Example: ``python scripts/fuzz_server.py --max-time 60 --seed 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchlib import Server

HERE = Path(__file__).resolve().parent
DEFAULT_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="exported model folder (default: the tiny random model)")
    parser.add_argument("--max-time", type=int, default=90, help="schemathesis budget, seconds")
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    parser.add_argument("--max-tokens", type=int, default=16, help="cap on generated tokens")
    parser.add_argument("--checks", default=",".join(DEFAULT_CHECKS), help="or 'all'")
    parser.add_argument("--mode", choices=("positive", "negative", "all"), default="all")
    parser.add_argument("--phases", default="examples,coverage,fuzzing")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="serve with this key and send it")
    parser.add_argument("--threads", type=int, default=1, help="model threads of the server")
    parser.add_argument("--report-dir", type=Path, default=None, help="keep the reports here")
    args = parser.parse_args(argv)
    if args.max_time < 1 or args.max_examples < 1 or args.max_tokens < 1:
        parser.error("--max-time, --max-examples and --max-tokens must be >= 1")
    return args


def _model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    from phi3edge.cli import tiny_demo_model

    return tiny_demo_model()


def _context_length(model: Path) -> int:
    try:
        return int(json.loads((model / "phi3edge.json").read_text())["context_length"])
    except (OSError, ValueError, KeyError):
        return 4096


def _schemathesis() -> list[str]:
    found = shutil.which("schemathesis") or shutil.which("st")
    return [found] if found else [sys.executable, "-m", "schemathesis.cli"]


def run_schemathesis(args: argparse.Namespace, url: str, out: Path, context: int) -> int:
    command = [
        *_schemathesis(),
        "run",
        f"{url}/openapi.json",
        "--checks",
        args.checks,
        "--mode",
        args.mode,
        "--phases",
        args.phases,
        "--max-examples",
        str(args.max_examples),
        "--max-time",
        str(args.max_time),
        "--workers",
        "1",  # the server generates on one engine thread; more would queue (and 429)
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--report",
        "json,vcr",
        "--report-dir",
        str(out),
        "--output-sanitize",
        "false",  # it would hide max_tokens values ("token") in the reproduction commands
        "--no-color",
    ]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    if args.api_key:
        command += ["--header", f"api-key: {args.api_key}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(HERE / "fuzz_hooks.py"),
        "PHI3EDGE_FUZZ_MAX_TOKENS": str(args.max_tokens),
        "PHI3EDGE_FUZZ_CONTEXT_LENGTH": str(context),
        "PHI3EDGE_FUZZ_STATS": str(out / "statuses.json"),
    }
    print("$ " + " ".join(command), flush=True)
    try:
        return subprocess.run(command, env=env, timeout=args.max_time + 120).returncode
    except subprocess.TimeoutExpired:
        print(f"schemathesis did not finish within {args.max_time + 120} s", flush=True)
        return 1


def _server_errors(log_path: Path) -> list[str]:
    """ERROR lines of the server log (phi3edge's ``ERROR name: ...``, uvicorn's ``ERROR: ...``)
    and uncaught tracebacks (e.g. in a thread)."""
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if line.startswith(("ERROR", "Traceback"))]


def summarize(out: Path, server_errors: list[str], exit_code: int, seconds: float) -> bool:
    report_files = sorted(out.glob("*.json"))
    report = next(
        (json.loads(p.read_text()) for p in report_files if p.name != "statuses.json"), None
    )
    stats: dict[str, int] = {}
    if (out / "statuses.json").exists():
        stats = json.loads((out / "statuses.json").read_text())
    print("\n==== fuzz_server summary ====")
    print(f"wall time: {seconds:.0f} s; schemathesis exit code: {exit_code}")
    if report:
        cases = report.get("test_cases") or {}
        ops = report.get("operations") or {}
        print(
            f"operations tested: {ops.get('tested')}/{ops.get('total')}; "
            f"test cases: {cases.get('generated')}; with failures: {cases.get('with_failures')}; "
            f"stop reason: {report.get('stop_reason')}"
        )
        for failure in report.get("failures", []):
            print(f"  FAILURE {failure['title']} x{failure['count']}: {failure['operations']}")
        for error in report.get("errors", []):
            print(f"  ERROR {error['title']} x{error['count']}")
    by_status: Counter[str] = Counter()
    for key, count in stats.items():
        method, path, status, media_type = key.split(" ")
        by_status[f"{status} {media_type}"] += count
    if stats:
        print("responses: " + ", ".join(f"{k} x{v}" for k, v in sorted(by_status.items())))
    if server_errors:
        print(f"server log has {len(server_errors)} ERROR line(s), e.g.:")
        for line in server_errors[:5]:
            print("  " + line[:300])
    ok = exit_code == 0 and not server_errors
    print("PASSED" if ok else "FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    model = _model_dir(args.model)
    with tempfile.TemporaryDirectory(prefix="phi3edge-fuzz-") as tmp:
        out = args.report_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        flags = ["--threads", str(args.threads)] + (
            ["--api-key", args.api_key] if args.api_key else []
        )
        server = Server(model, out / "server.log", flags)
        print(f"server: {server.url} ({model})", flush=True)
        try:
            code = run_schemathesis(args, server.url, out, _context_length(model))
        finally:
            server.stop()
        errors = _server_errors(server.log_path)
        ok = summarize(out, errors, code, time.monotonic() - started)
        if not ok and args.report_dir is None:
            print("(re-run with --report-dir DIR to keep the reports and the server log)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
