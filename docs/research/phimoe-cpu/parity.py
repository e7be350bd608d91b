"""Per-position logits: transformers fp32 vs onnxruntime (one prefill pass) vs onnxruntime-genai
(og.Generator fed one token per step, so positions 1.. go through the KV-cache decode path).

    python parity.py SRC_DIR ONNX_DIR
"""

import sys

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import torch
from transformers import AutoTokenizer, PhimoeForCausalLM

src, onnx_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(src)
# Phi-3.5 chat format written out (the fixture tokenizer_config carries no chat_template key).
prompt = (
    "<|user|>\nExplain why the sky is blue, in one short sentence please.<|end|>\n<|assistant|>\n"
)
ids = tok(prompt)["input_ids"]
ids = np.array(ids, dtype=np.int64)
S = len(ids)

model = PhimoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
with torch.no_grad():
    ref = model(torch.tensor(ids)[None]).logits[0].numpy()

sess = ort.InferenceSession(f"{onnx_dir}/model.onnx", providers=["CPUExecutionProvider"])
feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, S), np.int64)}
for i in sess.get_inputs():
    if i.name.startswith("past_key_values"):
        feeds[i.name] = np.zeros(
            (
                1,
                i.shape[1],
                0,
                i.shape[3]
                if isinstance(i.shape[3], int)
                else model.config.hidden_size // model.config.num_attention_heads,
            ),
            np.float32,
        )
ort_logits = sess.run(["logits"], feeds)[0][0]

og_model = og.Model(onnx_dir)
params = og.GeneratorParams(og_model)
params.set_search_options(max_length=S + 8, do_sample=False)
gen = og.Generator(og_model, params)
og_logits = []
for t in ids:
    gen.append_tokens(np.array([t], dtype=np.int32))
    og_logits.append(np.array(gen.get_logits()).reshape(-1)[-ref.shape[1] :])
og_logits = np.stack(og_logits)


def report(name, got):
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    mad = np.abs(got - ref).max(-1)
    agree = got.argmax(-1) == ref.argmax(-1)
    print(
        f"{name}: positions={S} cosine min={cos.min():.6f} mean={cos.mean():.6f} "
        f"max|diff| max={mad.max():.4g} mean={mad.mean():.4g} argmax agree={agree.sum()}/{S} "
        f"(logit scale: ref std {ref.std():.3g}, max |ref| {np.abs(ref).max():.3g})"
    )
    print("  per-position cosine :", " ".join(f"{c:.4f}" for c in cos))
    print("  per-position max|d| :", " ".join(f"{m:.3g}" for m in mad))
    print("  argmax mismatches at:", [int(i) for i in np.nonzero(~agree)[0]])


report("onnxruntime prefill", ort_logits)
report("onnxruntime-genai step-by-step", og_logits)

# Greedy continuation: transformers vs og (prompt in one append, then decode).
params = og.GeneratorParams(og_model)
params.set_search_options(max_length=S + 12, do_sample=False)
gen = og.Generator(og_model, params)
gen.append_tokens(ids.astype(np.int32)[None])
while not gen.is_done():
    gen.generate_next_token()
og_out = list(gen.get_sequence(0))[S:]
with torch.no_grad():
    hf_out = model.generate(
        torch.tensor(ids)[None],
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, S:].tolist()
print("greedy og  :", og_out)
print("greedy hf  :", hf_out[: len(og_out)])
