"""Builds the real CLIP BPE vocabulary (`vocab.json` + `merges.txt`, the
transformers CLIPTokenizer layout) from `bpe_simple_vocab_16e6.txt.gz`, the file
the open_clip_torch wheel ships. No hub download is involved.

    PYTHONPATH=onnx python -m spo_onnx.clip_vocab OUT_DIR [--bpe PATH]
"""

import argparse
import gzip
import json
import os

N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges; vocab = 512 + merges + 2


def byte_symbols():
    """The reversible byte -> printable unicode map used by GPT-2/CLIP BPE, in
    vocabulary order (printable bytes first, then the rest shifted past 255)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def default_bpe_path():
    import open_clip

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def build(bpe_path):
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(l.split()) for l in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges


def write(out_dir, bpe_path=None):
    vocab, merges = build(bpe_path or default_bpe_path())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--bpe", default=None)
    a = ap.parse_args()
    write(a.out_dir, a.bpe)
