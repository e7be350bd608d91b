"""Batch jobs on Ray (the optional [ray] extra): a local Ray instance, two actors of one CPU each,
must answer exactly what the single-process job answers for the same seeded requests (fp32, so
a request gives the same tokens whatever batch it lands in).

Skipped only when Ray is not installed (the test extra installs it: `pip install ".[test]"`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from test_batch import _answer, _by_id, _line, _read, _requests  # noqa: E402

from phi3edge import batch  # noqa: E402
from phi3edge.batch_ray import ChatPredictor  # noqa: E402
from phi3edge.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Two CPUs for two one-CPU actors, one for Ray Data's read tasks. The workers import the
    installed phi3edge and these tests (the pipeline test ships a class defined here); never
    the source tree, which holds no compiled sampler unless built in place."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-driver"))  # Ray puts the driver's cwd on workers' path
    ray.init(
        num_cpus=3,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = 120  # every actor loads its model before rows go out
    try:
        yield
    finally:
        ray.shutdown()
        os.chdir(previous)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Path) -> tuple[Path, dict[str, Any]]:
    """A JSONL job with a few bad lines, and its single-process answers."""
    lines = _requests(24, max_tokens=16)
    lines[3:3] = ["not json", _line("bad-url", {}, url="/v1/embeddings")]
    lines.append(_line("refused", {"messages": [], "max_tokens": 2}))
    source = tmp_path_factory.mktemp("ray") / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    return source, _by_id(list(batch.run(tiny_fp32, source, threads=1)))


class _PidPredictor(ChatPredictor):
    """Which actor answered each row."""

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[Any]]:
        columns = super().__call__(rows)
        columns["pid"] = [os.getpid()] * len(columns["custom_id"])
        return columns


def test_predictor_in_a_pipeline_uses_both_actors_and_answers_as_one_process(
    local_ray: None, tiny_fp32: Path, job: tuple[Path, dict[str, Any]]
) -> None:
    source, expected = job
    rows = [{"request": text} for text in source.read_text().splitlines()]
    answers = ray.data.from_items(rows, override_num_blocks=4).map_batches(
        _PidPredictor,
        fn_constructor_kwargs={"model_dir": str(tiny_fp32)},
        compute=ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1),
        num_cpus=1,
        batch_size=8,
    )
    got = answers.take_all()
    assert len({row["pid"] for row in got}) == 2, "both actors answered rows"
    outputs = [json.loads(row["output"]) for row in got]
    answered = _by_id([o for o in outputs if o["custom_id"] is not None])
    assert set(answered) == {k for k in expected if k is not None}
    for custom_id, output in answered.items():
        if output["response"] is None:  # a line error: the same, bar the line number
            assert output["error"]["code"] == expected[custom_id]["error"]["code"]
            continue
        assert _answer(output) == _answer(expected[custom_id]), custom_id
    row = next(r for r in got if r["custom_id"] == "r0")
    assert row["status_code"] == 200
    assert row["content"] == expected["r0"]["response"]["body"]["choices"][0]["message"]["content"]


def test_batch_command_on_ray_writes_what_one_process_writes(
    local_ray: None, tiny_fp32: Path, job: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    source, expected = job
    out = tmp_path / "out.jsonl"
    command = ["batch", str(tiny_fp32), str(source), "-o", str(out), "--ray"]
    assert main([*command, "--actors", "2", "--cpus-per-actor", "1"]) == 0
    written = _read(out)
    assert len(written) == len(expected)
    got = {o["custom_id"]: o for o in written}
    for custom_id, output in expected.items():
        if output["response"] is None:
            assert got[custom_id]["error"] == output["error"]  # line numbers included
        else:
            assert _answer(got[custom_id]) == _answer(output), custom_id
    assert main([*command]) == 0  # a rerun has nothing left to do
    assert len(_read(out)) == len(expected)
