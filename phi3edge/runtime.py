"""Load an exported phi3edge folder into onnxruntime-genai, with the thread count set explicitly.

Input: a folder written by ``phi3edge export`` and an optional thread count.
Output: ``LoadedModel``: the og model and tokenizer, the manifest, EOS ids, the token table.
Errors: ``ExportError`` for a folder that is not a phi3edge export.

onnxruntime-genai's builder writes a genai_config.json that leaves ONNX Runtime on one thread here
(full Phi-3-mini INT4: 10.8 / 5.3 tok/s prefill/decode, 22.5 / 10.2 with two threads), so the
session options are overlaid at load time: default, the machine's physical cores.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3edge.detokenize import TokenTable
from phi3edge.export import ExportError, Manifest
from phi3edge.guidance import GrammarTokenizer

log = logging.getLogger(__name__)


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's memory bandwidth and FMA units)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
        if cores:
            return int(cores)
    except ImportError:
        pass
    try:
        siblings: set[str] = set()
        for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
            siblings.add(cpu.read_text().strip())
        if siblings:
            return len(siblings)
    except OSError:
        pass
    return os.cpu_count() or 1


def config_overlay(threads: int, pad_id: int, adapters: bool = False) -> dict[str, Any]:
    """The genai_config fragment we apply at load time.

    - ONNX Runtime's thread pools, set explicitly.
    - End of sequence: our sampler decides when a choice ends (``LoadedModel.eos_ids``). The
      engine feeds a batch's last prompt token, ``<|assistant|>`` (an EOS id in Phi-3's config),
      through a forced greedy step, which onnxruntime-genai would treat as the end of that row.
      So onnxruntime-genai's own EOS set is narrowed to the pad id, which we never force for a
      running row.
    - With LoRA adapters, ONNX Runtime warns once per LoRA input that an initializer which is
      also a graph input is not constant-folded (hundreds of lines for a full model): that is
      the point of those inputs, so its log is kept to errors.
    """
    session: dict[str, Any] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if adapters:
        session["log_severity_level"] = 3
    return {
        "model": {
            "eos_token_id": pad_id,  # an int: overlaying a list would append to the list
            "decoder": {"session_options": session},
        }
    }


class KvLedger:
    """The KV cache bytes that a model's live generators reserve: each one's max_length x rows
    x bytes per token, from its creation until onnxruntime-genai frees it.

    The engine starts a request only while the ledger and the new request's reservation fit in
    the memory free at load, so concurrent requests cannot together take more than that. A
    generator is released by a weakref finalizer when its last reference goes, so nothing has
    to remember to release it; the lock covers a finalizer that runs on another thread (a
    garbage collection triggered there).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a finalizer may run while this thread holds it
        self.in_use = 0  # bytes
        self.generators = 0

    def hold(self, generator: Any, nbytes: int) -> None:
        """Count ``nbytes`` until ``generator`` is freed."""
        with self._lock:
            self.in_use += nbytes
            self.generators += 1
        weakref.finalize(generator, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.in_use -= nbytes
            self.generators -= 1


@dataclass
class LoadedModel:
    """An exported model, ready for the engine."""

    folder: Path
    manifest: Manifest
    model: Any
    tokenizer: Any
    table: TokenTable
    eos_ids: frozenset[int]
    pad_id: int
    vocab_size: int
    kv_bytes_per_token: int
    context_length: int
    threads: int
    grammar_tokenizer: GrammarTokenizer  # structured output; built on its first use
    adapters: Any = None  # og.Adapters holding every adapter of the manifest, or None
    adapter_names: tuple[str, ...] = ()
    # Longest generator whose KV cache may be one shared, preallocated buffer; None: any.
    # Exports made before 2026-12-07 carry the builder's "sliding_window" section in
    # genai_config.json, with which onnxruntime-genai 0.18 sizes that buffer to the window
    # (``shared_kv_limit``).
    shared_kv_limit: int | None = None
    # Largest KV cache (bytes) a batch preallocates as one shared buffer (a larger one grows step
    # by step; a lone request always preallocates), and the size of the kept conversation's
    # cache allocated with the model (``kv_preallocate_bytes``).
    kv_preallocate_bytes: int = 2 << 30
    memory_free_at_load: int | None = None  # bytes (``available_memory``); None: unknown
    kv_ledger: KvLedger | None = None  # the live generators' KV caches (engine side only)

    @property
    def name(self) -> str:
        return self.manifest.catalog_id

    @property
    def kv_tokens_in_memory(self) -> int | None:
        """How many tokens' KV cache the memory free at load holds (None: unknown): a request
        needing more could only end with the process killed for lack of memory."""
        if self.memory_free_at_load is None:
            return None
        return self.memory_free_at_load // self.kv_bytes_per_token

    @property
    def kv_tokens_free(self) -> int | None:
        """How many more tokens' KV cache fit beside the live generators' (None: unknown)."""
        if self.memory_free_at_load is None:
            return None
        in_use = self.kv_ledger.in_use if self.kv_ledger is not None else 0
        return max(0, self.memory_free_at_load - in_use) // self.kv_bytes_per_token

    def adapter_named(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` names (any case), or None for the base model."""
        return adapter_named(self.adapter_names, name)


def adapter_named(adapter_names: Sequence[str], name: str | None) -> str | None:
    """The one of ``adapter_names`` that ``name`` names (any case), or None."""
    if not name:
        return None
    return next((a for a in adapter_names if a.lower() == name.lower()), None)


def _kv_bytes_per_token(decoder: dict[str, Any]) -> int:
    """Keys + values of every layer for one token (float32 on CPU exports)."""
    heads = decoder.get("num_key_value_heads", decoder["num_attention_heads"])
    return 2 * decoder["num_hidden_layers"] * heads * decoder["head_size"] * 4


def shared_kv_limit(decoder: dict[str, Any]) -> int | None:
    """How long a shared (preallocated) KV cache may be for this genai_config decoder section.

    With a "sliding_window" section onnxruntime-genai 0.18 makes that buffer about the window
    long (2063 positions for a 2047 window), and the model call past it fails; a growing cache
    has no such bound. ``export`` no longer writes the section (``windowed_kv_cache=false``)."""
    window = decoder.get("sliding_window")
    return int(window["window_size"]) if window else None


KV_PREALLOCATE_FLOOR = 2 << 30


def kv_preallocate_bytes(available: int | None, holders: int) -> int:
    """The largest KV cache a batch preallocates, and the size of the kept conversation's
    (``engine.PrefixCache.warm``), given the memory ``available`` once the model is loaded (None:
    unknown) and how many generators may hold one at a time.

    A shared, preallocated buffer is what onnxruntime-genai decodes fastest with; a growing
    cache copies the whole KV at every step (full Phi-3-mini here: 0.92x the decode speed at 128
    tokens of context, 0.27x at 2000; ``scripts/bench_kv_cache.py``). But the buffer is zeroed,
    so resident, for the whole reservation, and a batch's rows rarely use all their max_tokens.
    So: free / (holders + 1), a share per holder and one for everything else, and never less
    than 2 GiB (the bound for every generator until 2026-12-07; Phi-3-mini's 4k context takes
    3.2 GB) unless less than that is free."""
    if available is None:
        return KV_PREALLOCATE_FLOOR
    return min(available, max(KV_PREALLOCATE_FLOOR, available // (holders + 1)))


def available_memory() -> int | None:
    """Bytes the kernel could hand out without swapping (Linux ``MemAvailable``); None where
    /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def load(
    folder: str | os.PathLike[str], threads: int | None = None, kv_holders: int = 3
) -> LoadedModel:
    """Load ``folder`` (an exported model) with ``threads`` intra-op threads. ``kv_holders``: how
    many generators may hold a KV cache at a time (active batches plus kept conversations), which
    sizes the largest preallocated one (``kv_preallocate_bytes``)."""
    import onnxruntime_genai as og

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist")
    manifest = Manifest.read(folder)
    threads = physical_cores() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    genai = json.loads((folder / "genai_config.json").read_text("utf-8"))
    eos = genai["model"]["eos_token_id"]
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    pad = genai["model"].get("pad_token_id")  # null in some published configs (medium-128k)
    pad_id = int(pad) if pad is not None else min(eos_ids)
    config = og.Config(str(folder))
    config.overlay(json.dumps(config_overlay(threads, pad_id, bool(manifest.adapters))))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    adapters = load_adapters(model, folder, manifest)
    free = available_memory()
    limit = shared_kv_limit(genai["model"]["decoder"])
    if limit is not None:
        log.warning(
            "%s was exported before phi3edge dropped genai_config.json's sliding_window "
            "section: requests longer than %d tokens use a growing KV cache, which decodes "
            "several times slower at long contexts; export it again to lift this",
            folder,
            limit,
        )
    log.info(
        "loaded %s (%s) from %s with %d threads",
        manifest.catalog_id,
        manifest.precision,
        folder,
        threads,
    )
    vocab_size = int(genai["model"]["vocab_size"])
    return LoadedModel(
        folder=folder,
        manifest=manifest,
        model=model,
        tokenizer=tokenizer,
        table=TokenTable(folder / "tokenizer.json"),
        eos_ids=eos_ids,
        pad_id=pad_id,
        kv_bytes_per_token=_kv_bytes_per_token(genai["model"]["decoder"]),
        vocab_size=vocab_size,
        context_length=int(genai["model"]["context_length"]),
        threads=threads,
        grammar_tokenizer=GrammarTokenizer(folder / "tokenizer.json", vocab_size, eos_ids),
        adapters=adapters,
        adapter_names=tuple(manifest.adapters),
        shared_kv_limit=limit,
        kv_preallocate_bytes=kv_preallocate_bytes(free, kv_holders),
        memory_free_at_load=free,
        kv_ledger=KvLedger(),
    )


def load_adapters(model: Any, folder: Path, manifest: Manifest) -> Any:
    """Every adapter of the manifest loaded into one ``og.Adapters`` (None without adapters).

    onnxruntime-genai keeps them beside the one copy of the base weights; a generator
    activates one of them (``engine``)."""
    if not manifest.adapters:
        return None
    import onnxruntime_genai as og

    adapters = og.Adapters(model)
    for name, entry in manifest.adapters.items():
        path = folder / entry["file"]
        if not path.is_file():
            raise ExportError(
                f"adapter '{name}': {path} is missing; `phi3edge adapter remove {folder} {name}` "
                "and add it again"
            )
        adapters.load(str(path), name)
    log.info("loaded %d adapter(s): %s", len(manifest.adapters), ", ".join(manifest.adapters))
    return adapters
