"""(a) How often sparsemixer differs from plain top-2 softmax on this prompt; (b) the int4/fp32 export
with QMoE's router_weights input removed (kernel's own softmax routing) vs the in-graph sparsemixer."""

import shutil
import subprocess
import sys

import onnx
import torch
from transformers import AutoTokenizer, PhimoeForCausalLM
from transformers.models.phimoe.modeling_phimoe import sparsemixer

src = sys.argv[1] if len(sys.argv) > 1 else "tiny-phimoe"
out = sys.argv[2] if len(sys.argv) > 2 else "out-int4-fp32"
model = PhimoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(src)
ids = tok(
    "<|user|>\nExplain why the sky is blue, in one short sentence please.<|end|>\n<|assistant|>\n"
)["input_ids"]
logits = []
hooks = [
    l.mlp.router.register_forward_hook(lambda m, i, o: logits.append(o[0]))
    for l in model.model.layers
]
with torch.no_grad():
    model(torch.tensor(ids)[None])
for li, L in enumerate(logits):
    w, sel = sparsemixer(L, jitter_eps=model.config.router_jitter_noise, training=False)
    top = torch.softmax(L, -1).topk(2)
    plain = top.values / top.values.sum(-1, keepdim=True)
    print(
        f"layer {li}: tokens={L.shape[0]} sparsemixer weight sums mean={w.sum(-1).mean():.3f} "
        f"max |sparsemixer - renormalized softmax top2|={(w - plain).abs().max():.3f} "
        f"first-choice weight==1 for {(w[:, 0] > 0.999).sum().item()} tokens"
    )
m = onnx.load(f"{out}/model.onnx")
for n in m.graph.node:
    if n.op_type == "QMoE":
        del n.input[14:]
        for a in n.attribute:
            if a.name == "normalize_routing_weights":
                a.i = 1
shutil.rmtree("out-ablation", ignore_errors=True)
shutil.copytree(out, "out-ablation")
onnx.save(m, "out-ablation/model.onnx", save_as_external_data=True, location="model.onnx.data")
print(
    subprocess.run(
        [sys.executable, "fakequant_parity.py", src, "out-ablation"], capture_output=True, text=True
    ).stdout
)
