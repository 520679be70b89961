#!/usr/bin/env python3
"""transformers loads `flashgpt export --format hf` and its logits equal ours (fp32, so
within 1e-4). Runs where torch and transformers are installed (the GPU machine); exits 77
(ctest: skipped) with the reason elsewhere.
Usage: export_hf_test.py PATH/TO/flashgpt PATH/TO/train_logits_tool"""
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
    import transformers
except ImportError as e:
    print(f"skipped: needs numpy, torch and transformers ({e})")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_fixtures import VOCAB, write_dataset  # noqa: E402

FLASHGPT, TOOL = sys.argv[1], sys.argv[2]


def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_export_hf_")
    ds = write_dataset(os.path.join(tmp, "ds"))
    run = os.path.join(tmp, "run")
    subprocess.run([FLASHGPT, "train", "--preset", "tiny", "--data", ds, "--out", run, "--steps", "20", "--batch",
                    "4", "--context", "32", "--lr", "3e-3", "--quiet", "--no-plot"], check=True, timeout=600)
    subprocess.run([FLASHGPT, "export", "--format", "hf", run, "--out", os.path.join(tmp, "hf")], check=True)
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(tmp, "hf")).eval()
    assert model.config.vocab_size == VOCAB
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "head not tied"
    ids = list(np.random.default_rng(5).integers(0, VOCAB, size=33))
    r = subprocess.run([TOOL, os.path.join(run, "checkpoint.safetensors"), ",".join(map(str, ids))], check=True,
                       capture_output=True, text=True)
    ours = np.array(json.loads(r.stdout)["logits"]).reshape(32, VOCAB)
    with torch.no_grad():
        out = model(torch.tensor([ids[:32]]), labels=torch.tensor([ids[:32]]))
    theirs = out.logits[0].double().numpy()
    err = np.abs(theirs - ours).max()
    print(f"max |logits(transformers {transformers.__version__}) - ours| = {err:.2e}")
    assert err < 1e-4 * max(1.0, np.abs(ours).max()), err
    print("all passed")


if __name__ == "__main__":
    main()
