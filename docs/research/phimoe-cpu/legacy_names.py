"""Rewrite a tiny checkpoint into the hub layout of microsoft/Phi-3.5-MoE-instruct (architecture
PhiMoEForCausalLM, rope_scaling, block_sparse_moe.gate + experts.N.w1/w2/w3) to exercise transformers 5's
conversion mapping (conversion_mapping.py "phimoe") on the way into the builder."""

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(src, out)
cfg = json.loads((out / "config.json").read_text())
cfg["architectures"] = ["PhiMoEForCausalLM"]
cfg["rope_scaling"] = {
    k: v for k, v in cfg.pop("rope_parameters").items() if k not in ("rope_type", "rope_theta")
}
(out / "config.json").write_text(json.dumps(cfg, indent=2))
new = {}
for f in out.glob("*.safetensors"):
    for k, v in load_file(f).items():
        if k.endswith("mlp.router.weight"):
            new[k.replace("mlp.router.weight", "block_sparse_moe.gate.weight")] = v
        elif k.endswith("mlp.experts.gate_up_proj"):
            I = v.shape[1] // 2
            for e in range(v.shape[0]):
                p = k.replace("mlp.experts.gate_up_proj", f"block_sparse_moe.experts.{e}.")
                new[p + "w1.weight"], new[p + "w3.weight"] = v[e, :I].clone(), v[e, I:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                new[
                    k.replace("mlp.experts.down_proj", f"block_sparse_moe.experts.{e}.w2.weight")
                ] = v[e].clone()
        else:
            new[k] = v
    f.unlink()
save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
print(sorted(k for k in new if "layers.0." in k))
