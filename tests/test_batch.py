"""Batch jobs (`phi3edge batch`, `phi3edge.batch.run`): Batch API files in and out, bad lines,
duplicate ids, resumption after a killed run, Ctrl-C.

Output lines are read with the real `openai` package's models (ChatCompletion for a response
body, BatchError for a line-level error), and a refused body must get exactly the answer the
HTTP server gives for it on the same route.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
from openai.types import BatchError
from openai.types.batch_create_params import BatchCreateParams
from openai.types.chat import ChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from pydantic import TypeAdapter
from test_server import BAD_INPUT

from phi3edge import batch
from phi3edge.batch_file import BatchOutputError, OutputFile
from phi3edge.client import ChatCompletionsClient
from phi3edge.service import ChatService

# The command runs as a user runs it: the installed package, from a folder away from this source
# tree (which holds no compiled sampler unless built in place).
AWAY = Path(tempfile.gettempdir())
NO_END = {"32007": -100, "32000": -100, "32001": -100}  # keep generating until max_tokens

# The example lines of the OpenAI Batch API guide and of Azure OpenAI's batch how-to.
OPENAI_EXAMPLE = [
    {
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-3.5-turbo-0125",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello world!"},
            ],
            "max_tokens": 1000,
        },
    },
    {
        "custom_id": "request-2",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-3.5-turbo-0125",
            "messages": [
                {"role": "system", "content": "You are an unhelpful assistant."},
                {"role": "user", "content": "Hello world!"},
            ],
            "max_tokens": 1000,
        },
    },
]
AZURE_EXAMPLE = [
    {
        "custom_id": f"task-{i}",
        "method": "POST",
        "url": "/chat/completions",
        "body": {
            "model": "REPLACE-WITH-MODEL-DEPLOYMENT-NAME",
            "messages": [
                {
                    "role": "system",
                    "content": "You are an AI assistant that helps people find information.",
                },
                {"role": "user", "content": question},
            ],
        },
    }
    for i, question in enumerate(
        [
            "When was Microsoft founded?",
            "When was the first XBOX released?",
            "What is Altair Basic?",
        ]
    )
]


def _line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _requests(count: int, max_tokens: int) -> list[str]:
    """Seeded, sampled requests of mixed prompt lengths that run to max_tokens."""
    return [
        _line(
            f"r{i}",
            {
                "messages": [{"role": "user", "content": "word " * (1 + i % 7) + str(i)}],
                "max_tokens": max_tokens,
                "seed": i,
                "temperature": 0.8,
                "logit_bias": NO_END,
            },
        )
        for i in range(count)
    ]


def _by_id(outputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table = {o["custom_id"]: o for o in outputs}
    assert len(table) == len(outputs), "one output line per custom_id"
    return table


def _answer(output: dict[str, Any]) -> Any:
    """What an output line says, without its fresh ids and timestamps."""
    body = output["response"]["body"]
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def _read(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def fp32_service(tiny_fp32: Path) -> Iterator[ChatService]:
    """fp32: a seeded request gives the same tokens batched or alone (INT4 does not quite)."""
    service = ChatService(tiny_fp32, threads=1)
    yield service
    service.close()


# ----------------------------------------------------------------------------- formats


def test_example_lines_of_both_clouds_answer_in_the_output_format(service: ChatService) -> None:
    endpoints = get_args(get_type_hints(BatchCreateParams, include_extras=True)["endpoint"])
    params = TypeAdapter(CompletionCreateParamsNonStreaming)
    for line in OPENAI_EXAMPLE:  # the example input is what openai's own types describe
        assert line["url"] in get_args(endpoints[0])
        list(params.validate_python(line["body"])["messages"])
    outputs = {}
    for example in (OPENAI_EXAMPLE, AZURE_EXAMPLE):  # one file each: a batch names one model
        outputs.update(_by_id(list(batch.run(service, [json.dumps(x) for x in example]))))

    assert set(outputs) == {"request-1", "request-2", "task-0", "task-1", "task-2"}
    for output in outputs.values():
        assert set(output) == {"id", "custom_id", "response", "error"}
        assert output["error"] is None and output["id"].startswith("batch_req_")
        assert set(output["response"]) == {"status_code", "request_id", "body"}
        assert output["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(output["response"]["body"])
        assert completion.object == "chat.completion"
        # The file names the cloud's deployment; the model that answered says who it is.
        assert completion.model == service.model_name
        assert completion.choices[0].message.role == "assistant"
        assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_answers_equal_the_same_requests_run_one_at_a_time(fp32_service: ChatService) -> None:
    from phi3edge.schema import parse_request

    lines = _requests(12, max_tokens=12)
    before = fp32_service.core.stats.batched_requests
    outputs = _by_id(list(batch.run(fp32_service, lines)))
    assert fp32_service.core.stats.batched_requests > before, "the engine batched them"
    for text in lines:
        line = json.loads(text)
        alone = fp32_service.complete(parse_request(line["body"], route="openai"))
        assert _answer(outputs[line["custom_id"]]) == {
            k: v for k, v in alone.as_dict().items() if k not in ("id", "created")
        }


def _server_cases() -> list[tuple[str, str, str | None, Any]]:
    """The server's bad-input cases that are a chat body on a chat route (id, url, policy,
    body). Left out: the HTTP layer's own cases (size, keys, media type, JSON syntax, which a
    batch line reports as a line error), the model name (a batch runs the model it was given,
    see phi3edge.batch), and stream cases the engine refuses (a batch refuses every stream)."""
    cases = []
    for case_id, method, path, headers, body, _status, code in BAD_INPUT:
        if method != "POST" or path not in batch.CHAT_URLS or set(headers) - {"extra-parameters"}:
            continue
        if code == "invalid_json":
            continue
        if case_id in ("oversized-body", "unknown-model", "unknown-model-stream"):
            continue
        if case_id == "context-overflow-stream":
            continue
        if isinstance(body, bytes):
            body = json.loads(body)
        cases.append((case_id, path, headers.get("extra-parameters"), body))
    return cases


SERVER_CASES = _server_cases()


def test_a_refused_body_gets_the_servers_answer(
    service: ChatService, client_factory: Callable[..., Any]
) -> None:
    assert len(SERVER_CASES) >= 30
    http = client_factory()
    for case_id, url, policy, body in SERVER_CASES:
        headers = {
            "Content-Type": "application/json",
            **({"extra-parameters": policy} if policy else {}),
        }
        expected = http.post(url, content=json.dumps(body), headers=headers)
        line = json.dumps({"custom_id": case_id, "method": "POST", "url": url, "body": body})
        [output] = batch.run(service, [line], extra_parameters=policy)
        assert output["custom_id"] == case_id and output["error"] is None
        got = (output["response"]["status_code"], output["response"]["body"])
        assert got == (expected.status_code, expected.json()), case_id


def test_bad_lines_become_error_lines_and_the_job_goes_on(service: ChatService) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    lines = [
        "this is not JSON",
        '{"custom_id": "nan", "method": "POST", "url": "/v1/chat/completions", "body": NaN}',
        "[1, 2]",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": good}),
        json.dumps({"custom_id": "", "method": "POST", "url": "/chat/completions", "body": good}),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/chat/completions", "body": good}),
        json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": good}),
        json.dumps({"custom_id": "extra", "method": "POST", "url": "/chat/completions",
                    "body": good, "priority": 1}),
        "",  # blank lines are not requests
        _line("no-body", None),  # type: ignore[arg-type]
        _line("stream", {**good, "stream": True}),
        _line("ok", good),
    ]  # fmt: skip
    outputs = list(batch.run(service, lines))
    assert len(outputs) == len(lines) - 1
    line_errors = [o for o in outputs if o["response"] is None]
    codes = [(o["custom_id"], o["error"]["code"], o["error"]["line"]) for o in line_errors]
    assert sorted(codes, key=lambda c: c[2]) == [
        (None, "invalid_json_line", 1),
        (None, "invalid_json_line", 2),
        (None, "invalid_line", 3),
        (None, "invalid_line", 4),
        (None, "invalid_line", 5),
        ("get", "invalid_method", 6),
        ("emb", "invalid_url", 7),
        ("extra", "invalid_line", 8),
    ]
    for output in line_errors:
        error = BatchError.model_validate(output["error"])
        assert error.message and f"line {error.line}" in error.message
    answered = _by_id([o for o in outputs if o["response"] is not None])
    assert answered["no-body"]["response"]["status_code"] == 400
    assert answered["no-body"]["response"]["body"]["error"]["code"] == "invalid_request"
    assert answered["stream"]["response"]["body"]["error"]["param"] == "stream"
    assert answered["ok"]["response"]["status_code"] == 200


def test_duplicate_ids_and_mixed_models_are_refused_before_the_model_loads(
    tmp_path: Path,
) -> None:
    no_model = tmp_path / "no-model"  # loading it would fail: the refusal must come first
    body = {"messages": [{"role": "user", "content": "hi"}]}
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([_line("a", body), _line("b", body), _line("a", body)]) + "\n")
    with pytest.raises(batch.BatchInputError, match=r"'a' is on line 1 and line 3"):
        batch.run(no_model, dup)
    with pytest.raises(batch.BatchInputError, match="unique"):
        batch.run(no_model, dup.read_text().splitlines())
    mixed = [_line("a", {**body, "model": "gpt-4o"}), _line("b", {**body, "model": "gpt-4o-mini"})]
    with pytest.raises(batch.BatchInputError, match="one model"):
        batch.run(no_model, mixed)


def test_a_one_pass_iterator_stops_at_a_duplicate(service: ChatService) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    lines = iter([_line("a", body), _line("a", body)])
    with pytest.raises(batch.BatchInputError, match="twice"):
        list(batch.run(service, lines))


def test_run_takes_a_client_and_skips_what_is_done(tiny_int4: Path) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    lines = ["oops", _line("a", body), _line("b", body)]
    with ChatCompletionsClient(tiny_int4, threads=1) as client:
        outputs = list(batch.run(client, lines, skip_ids={"a"}, skip_lines={1}))
    assert [o["custom_id"] for o in outputs] == ["b"]


# ----------------------------------------------------------------------------- the output file


def test_output_file_cuts_a_partial_last_line_and_reads_what_is_done(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputFile(path) as out:
        out.append(batch.response_line("a", 200, {"x": 1}))
        out.append(batch.error_line(batch.read_line("nope", 7)))
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id":"batch_req_1","custom_id":"b","resp')  # a crash mid-write
    with OutputFile(path) as out:
        assert out.truncated_bytes == len(b'{"id":"batch_req_1","custom_id":"b","resp')
        assert (out.done_ids, out.done_lines, out.lines) == ({"a"}, {7}, 2)
    assert path.read_bytes() == whole

    path.write_bytes(whole + b"not an output line\n" + whole)
    with pytest.raises(BatchOutputError, match="line 3"):
        OutputFile(path)
    assert path.read_bytes() == whole + b"not an output line\n" + whole  # left as it was


# ----------------------------------------------------------------------------- the command


def _batch_command(model: Path, source: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "phi3edge.cli", "batch", str(model), str(source), "-o", str(out),
            "--threads", "1", *flags]  # fmt: skip


def _start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=AWAY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("the batch wrote no lines in time")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Path) -> tuple[Path, Path]:
    """An input file and its output from one uninterrupted `phi3edge batch` run."""
    root = tmp_path_factory.mktemp("batch")
    source = root / "in.jsonl"
    source.write_text("\n".join(_requests(32, max_tokens=96)) + "\n")
    out = root / "reference.jsonl"
    done = subprocess.run(
        _batch_command(tiny_fp32, source, out), cwd=AWAY, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "32 requests answered (0 errors)" in done.stderr and "tokens/s" in done.stderr
    return source, out


def test_a_killed_run_resumes_with_one_line_per_custom_id(
    tiny_fp32: Path, reference_run: tuple[Path, Path], tmp_path: Path
) -> None:
    source, reference = reference_run
    out = tmp_path / "out.jsonl"
    first = _start(_batch_command(tiny_fp32, source, out))
    _wait_for_lines(out, 1, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = _read(out)
    assert 1 <= len(kept) < 32, "killed mid-run"
    with open(out, "ab") as handle:  # what a crash inside a write of an older version left
        handle.write(b'{"id":"batch_req_x","custom_id":"r31","response":{"status_co')

    second = subprocess.run(
        _batch_command(tiny_fp32, source, out), cwd=AWAY, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr
    assert "cut off a partial last line" in second.stderr
    assert f"resuming: {len(kept)} of 32" in second.stderr
    resumed = _by_id(_read(out))
    assert set(resumed) == {f"r{i}" for i in range(32)}
    assert all(resumed[o["custom_id"]] == o for o in kept), "earlier lines are kept as written"
    expected = _by_id(_read(reference))
    assert {k: _answer(v) for k, v in resumed.items()} == {
        k: _answer(v) for k, v in expected.items()
    }

    again = subprocess.run(
        _batch_command(tiny_fp32, source, out), cwd=AWAY, capture_output=True, text=True
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert len(_read(out)) == 32


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(
    tiny_fp32: Path, reference_run: tuple[Path, Path], tmp_path: Path
) -> None:
    source, reference = reference_run
    out = tmp_path / "out.jsonl"
    process = _start(_batch_command(tiny_fp32, source, out, "--window", "2"))
    _wait_for_lines(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    kept = _read(out)  # whole lines only
    assert 2 <= len(kept) < 32

    done = subprocess.run(
        _batch_command(tiny_fp32, source, out), cwd=AWAY, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    finished = _by_id(_read(out))
    assert {k: _answer(v) for k, v in finished.items()} == {
        k: _answer(v) for k, v in _by_id(_read(reference)).items()
    }


def test_batch_flags_default_to_the_job_limits() -> None:
    """`phi3edge batch`'s flag defaults are batch.job_limits' own; 'none' lifts the padding cap."""
    from phi3edge.cli import build_parser

    args = build_parser().parse_args(["batch", "model", "in.jsonl", "-o", "out.jsonl"])
    flags = batch.job_limits(args.window, args.batch_prefill_tokens, args.batch_padding)
    assert flags == batch.job_limits()
    args = build_parser().parse_args(["batch", "m", "i", "-o", "o", "--batch-padding", "none"])
    assert args.batch_padding is None


def test_command_refuses_duplicates_without_touching_the_output(
    tiny_int4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from phi3edge.cli import main

    body = {"messages": [{"role": "user", "content": "hi"}]}
    source = tmp_path / "in.jsonl"
    source.write_text(_line("a", body) + "\n" + _line("a", body) + "\n")
    assert main(["batch", str(tiny_int4), str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "custom_ids must be unique" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    missing = tmp_path / "missing.jsonl"
    assert main(["batch", str(tiny_int4), str(missing), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    source.write_text(_line("a", body) + "\n")
    assert main(["batch", str(tiny_int4), str(source), "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    for flags, words in [
        (["--batch-prefill-tokens", "0"], "batch_prefill_tokens must be >= 1"),
        (["--batch-padding", "-5"], "batch_padding_pct must be >= 0"),
        (["--window", "0"], "max_queue must be >= 1"),
    ]:
        out = tmp_path / "limits.jsonl"
        assert main(["batch", str(tiny_int4), str(source), "-o", str(out), *flags]) == 2
        assert words in capsys.readouterr().err
        assert not out.exists()
