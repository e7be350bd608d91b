"""onnxruntime-genai's builder, made to export Phi-3-small for CPU from our reference model.

Input: a Phi-3-small checkpoint folder (config.json, safetensors, cl100k_base.tiktoken or
tokenizer.json, tokenizer_config.json), an output folder, a precision and the builder's KEY=VALUE
options.
Output: the builder's model.onnx(+data), genai_config.json and tokenizer files.
Errors: whatever the builder raises, unchanged.

The builder already has Phi3SmallModel / Phi3SmallLongRoPEModel (fused QKV split, gegelu,
SparseAttention for the block-sparse layers), but as shipped (0.18) it cannot run here:

- it reads the config and the weights with ``AutoConfig`` / ``AutoModelForCausalLM`` and remote
  code, which imports triton; we hand it a plain ``PretrainedConfig`` and ``phi3_small.load``;
- it takes LayerNorm's epsilon from ``rms_norm_eps`` (absent: 1e-6) instead of
  ``layer_norm_epsilon`` (1e-5);
- Phi3SmallLongRoPEModel inherits the base ``make_rope_init``, which raises NotImplementedError
  for ``longrope`` and never sets the short/long caches it then reads; we set them with
  Phi-3-small's rule (short_mscale default 1.0, long default sqrt(1 + ln s / ln original)).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi3edge import phi3_small


def builder_config(checkpoint_dir: str | Path) -> Any:
    """A ``transformers.PretrainedConfig`` carrying config.json plus what the remote config class
    would have computed (intermediate_size, dummy_token_indices, original context)."""
    from transformers import PretrainedConfig

    folder = Path(checkpoint_dir)
    raw = json.loads((folder / "config.json").read_text("utf-8"))
    small = phi3_small.Phi3SmallConfig.from_dict(raw)
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "rope_scaling")}
    config = PretrainedConfig(**fields)
    config._name_or_path = str(folder)
    config.architectures = [phi3_small.ARCHITECTURE]
    config.intermediate_size = small.intermediate_size
    config.original_max_position_embeddings = small.original_max_position_embeddings
    config.dummy_token_indices = list(small.dummy_token_indices)
    config.tie_word_embeddings = small.tie_word_embeddings
    if small.rope_scaling:
        config.rope_scaling = dict(small.rope_scaling)
        config.rope_parameters = {"rope_type": "longrope", **small.rope_scaling}
    return config


def _model_classes(builders: Any) -> tuple[type, type]:
    """Subclasses of the builder's Phi-3-small classes with our loader and the fixes above."""

    class _Fixes:
        def load_weights(self: Any, input_path: str) -> Any:
            return phi3_small.load(input_path)

        def make_rope_init(self: Any, config: Any) -> None:
            params = getattr(config, "rope_parameters", None)
            if not isinstance(params, dict) or params.get("rope_type") != "longrope":
                return builders.Model.make_rope_init(self, config)
            import math

            import torch

            ratio = self.context_length / self.original_context_length
            long_mscale = float(params.get("long_mscale", 0) or 0)
            if long_mscale <= 0:
                original = self.original_context_length
                long_mscale = (
                    math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1
                )
            short_mscale = float(params.get("short_mscale", 0) or 0)
            self.rope_attrs["mscale_policy"] = params.get("type", "longrope")
            self.rope_attrs["multi_cache"] = {
                "short_factor": torch.tensor(params["short_factor"], dtype=torch.float32),
                "long_factor": torch.tensor(params["long_factor"], dtype=torch.float32),
                "short_mscale": short_mscale if short_mscale > 0 else 1.0,
                "long_mscale": long_mscale,
            }

        def save_processing(self: Any, model_name_or_path: str, extra: Any, out_dir: str) -> None:
            # The stock step loads the tokenizer through AutoTokenizer, which reads config.json
            # as a generic config and rejects Phi-3-small-128k's rope_scaling (no
            # original_max_position_embeddings inside it), and a published checkpoint's tokenizer
            # is remote code over tiktoken; the files are copied or converted instead.
            print(copy_tokenizer_files(model_name_or_path, out_dir, self.context_length))

    class Phi3SmallCPU(_Fixes, builders.Phi3SmallModel):
        def __init__(self, config: Any, *args: Any) -> None:
            super().__init__(config, *args)
            self.layernorm_attrs["epsilon"] = config.layer_norm_epsilon

    class Phi3SmallLongRoPECPU(_Fixes, builders.Phi3SmallLongRoPEModel):
        def __init__(self, config: Any, *args: Any) -> None:
            super().__init__(config, *args)
            self.layernorm_attrs["epsilon"] = config.layer_norm_epsilon

    return Phi3SmallCPU, Phi3SmallLongRoPECPU


def copy_tokenizer_files(source: str | Path, out_dir: str | Path, context_length: int) -> str:
    """tokenizer.json and tokenizer_config.json (model_max_length set to the context) into the
    export. A published checkpoint ships tiktoken's cl100k_base.tiktoken instead of tokenizer.json:
    it is converted (phi3edge.tiktoken_convert). Returns a line saying which."""
    from phi3edge.tiktoken_convert import write_phi3_small_tokenizer_files

    return write_phi3_small_tokenizer_files(source, out_dir, context_length)


@contextlib.contextmanager
def patched_builder(builder: Any, checkpoint_dir: str | Path) -> Iterator[None]:
    """Within the block, ``builder.parse_extra_options`` / ``create_model`` export a Phi-3-small
    checkpoint without transformers' Auto classes for config and weights."""
    import importlib

    builders = importlib.import_module("builders")
    short, long = _model_classes(builders)
    config = builder_config(checkpoint_dir)
    folder = str(Path(checkpoint_dir))

    def get_hf_details(model_name: Any, input_path: str, cache_dir: Any, options: Any) -> dict:
        return {"extra_kwargs": {}, "hf_name": folder, "hf_config": config}

    saved = {name: getattr(builder, name) for name in ("get_hf_details", "Phi3SmallModel")}
    saved["Phi3SmallLongRoPEModel"] = builder.Phi3SmallLongRoPEModel
    builder.get_hf_details = get_hf_details
    builder.Phi3SmallModel = short
    builder.Phi3SmallLongRoPEModel = long
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(builder, name, value)
