"""Isolate the QMoE graph from weight rounding: load the exported expert weights back from the ONNX
file, dequantize them ((q - 2^(bits-1)) * scale, per block along K, low nibble first), undo the
gate/up interleave, put them into the transformers model and compare logits again. Any remaining
difference is kernel arithmetic / routing, not quantization.

    python fakequant_parity.py SRC_DIR ONNX_DIR [N_TOKENS]   (use an export whose non-expert part is fp32)
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from transformers import AutoTokenizer, PhimoeForCausalLM

src, onnx_dir = sys.argv[1], sys.argv[2]
m = onnx.load(f"{onnx_dir}/model.onnx")
inits = {i.name: i for i in m.graph.initializer}
qmoe = [n for n in m.graph.node if n.op_type == "QMoE"]
bits = next(a.i for a in qmoe[0].attribute if a.name == "expert_weight_bits")


def deq(name):
    q = numpy_helper.to_array(inits[f"{name}.qweight"], base_dir=onnx_dir).astype(np.int32)
    s = numpy_helper.to_array(inits[f"{name}.scales"], base_dir=onnx_dir).astype(np.float32)
    if bits == 4:
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], q.shape[1], -1)
    w = (q - 2 ** (bits - 1)).astype(np.float32)
    E, N, K = w.shape
    blocks = s.shape[-1]
    return (w.reshape(E, N, blocks, K // blocks) * s[..., None]).reshape(E, N, K)


model = PhimoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
with torch.no_grad():
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.moe.experts"
        gu = deq(f"{p}.gate_up_proj")  # rows interleaved g0,u0,g1,u1,...
        gu = np.concatenate([gu[:, 0::2], gu[:, 1::2]], axis=1)
        orig = layer.mlp.experts.gate_up_proj.numpy()
        print(
            f"layer {i}: gate_up rel. rounding error {np.linalg.norm(gu - orig) / np.linalg.norm(orig):.4f}"
        )
        layer.mlp.experts.gate_up_proj.copy_(torch.from_numpy(gu))
        layer.mlp.experts.down_proj.copy_(torch.from_numpy(deq(f"{p}.down_proj")))

tok = AutoTokenizer.from_pretrained(src)
prompt = (
    "<|user|>\nExplain why the sky is blue, in one short sentence please.<|end|>\n<|assistant|>\n"
)
ids = np.array(tok(prompt)["input_ids"], dtype=np.int64)
if (
    len(sys.argv) > 3
):  # LONG=N: repeat the prompt up to N tokens (beyond original_max_position_embeddings)
    ids = np.resize(ids, int(sys.argv[3]))
S = len(ids)
with torch.no_grad():
    ref = model(torch.tensor(ids)[None]).logits[0].numpy()
sess = ort.InferenceSession(f"{onnx_dir}/model.onnx", providers=["CPUExecutionProvider"])
hd = model.config.hidden_size // model.config.num_attention_heads
feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, S), np.int64)}
for i in sess.get_inputs():
    if i.name.startswith("past_key_values"):
        feeds[i.name] = np.zeros((1, i.shape[1], 0, hd), np.float32)
got = sess.run(["logits"], feeds)[0][0]
cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
mad = np.abs(got - ref).max(-1)
print(
    f"{bits}-bit experts vs transformers with the same dequantized experts: cosine min={cos.min():.6f} "
    f"mean={cos.mean():.6f} max|diff| max={mad.max():.4g} argmax agree={(got.argmax(-1) == ref.argmax(-1)).sum()}/{S}"
)
if S <= 40:
    print("  per-position max|d| :", " ".join(f"{x:.2g}" for x in mad))
else:
    tail = f", >=256: {mad[256:].max():.3g}" if S > 256 else ""
    print(f"  max|d| positions <256: {mad[:256].max():.3g}{tail}")
