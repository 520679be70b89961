#!/usr/bin/env python3
"""Zero/one/few-shot newstest2014 translation of an exported run, generated on the GPU.

`flashgpt eval translate` generates with our CPU KV-cache engine, which is too slow for a
163M-parameter model on the GPU machine's time budget; until the CUDA decode path exists,
the GPU runs generate here instead: the run exported by `flashgpt export --format hf`,
loaded by transformers' GPT2LMHeadModel (which also checks the export), greedy decoding
with its KV cache, batched with left padding. Prompts are those of `eval translate`
("English: {en}\\nFrench:" after K demonstrations "English: ..\\nFrench: ..\\n\\n" drawn
with a seed from newstest2013), output stops at the first newline. Scores come from
`flashgpt eval bleu --json` (our sacreBLEU-equal C++), cross-checked with sacrebleu when
it is installed.

  translate_hf.py --hf DIR --wmt14 DIR --flashgpt BIN --out DIR [--limit N] [--shots 0,1,5]
"""
import argparse
import json
import lzma
import os
import random
import subprocess
import sys
import time

SEED_PROMPTS = ["Good morning.", "Thank you for your help.", "I enjoy learning new things."]


def read_lines(path):
    for candidate in (path, path + ".xz"):
        if os.path.exists(candidate):
            opener = lzma.open if candidate.endswith(".xz") else open
            with opener(candidate, "rt", encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f]
    sys.exit(f"translate_hf: {path}[.xz] not found")


def prompt_of(demos, source, en_fr):
    src, tgt = ("English", "French") if en_fr else ("French", "English")
    text = "".join(f"{src}: {d[0] if en_fr else d[1]}\n{tgt}: {d[1] if en_fr else d[0]}\n\n" for d in demos)
    return text + f"{src}: {source}\n{tgt}:"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--wmt14", required=True)
    ap.add_argument("--flashgpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--shots", default="0,1,5")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--encoding", default="cl100k_base")
    ap.add_argument("--tokenizer-dir", required=True, help="folder of ENCODING.tiktoken and ENCODING.meta.json")
    args = ap.parse_args()

    import tiktoken
    import torch
    from transformers import GPT2LMHeadModel

    os.makedirs(args.out, exist_ok=True)
    from tiktoken.load import load_tiktoken_bpe
    with open(os.path.join(args.tokenizer_dir, args.encoding + ".meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    ranks = load_tiktoken_bpe(os.path.join(args.tokenizer_dir, args.encoding + ".tiktoken"))
    enc = tiktoken.Encoding(name=args.encoding, pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                            mergeable_ranks=ranks)
    model = GPT2LMHeadModel.from_pretrained(args.hf, torch_dtype=torch.bfloat16).cuda().eval()
    ctx = model.config.n_positions
    test_en = read_lines(os.path.join(args.wmt14, "newstest2014.fr-en.en"))
    test_fr = read_lines(os.path.join(args.wmt14, "newstest2014.fr-en.fr"))
    dev = list(zip(read_lines(os.path.join(args.wmt14, "newstest2013.fr-en.en")),
                   read_lines(os.path.join(args.wmt14, "newstest2013.fr-en.fr"))))
    n = len(test_en) if args.limit <= 0 else min(args.limit, len(test_en))
    eot = enc.eot_token
    # Every token holding a newline ends a row (the output is cut at the first newline).
    stop_ids = [eot] + sorted(rank for piece, rank in ranks.items() if b"\n" in piece)

    @torch.no_grad()
    def generate(prompts):
        outs = []
        for s in range(0, len(prompts), args.batch):
            ids = [enc.encode_ordinary(p)[-(ctx - args.max_new_tokens):] for p in prompts[s:s + args.batch]]
            width = max(len(x) for x in ids)
            pad = [[eot] * (width - len(x)) + x for x in ids]
            mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]
            inp = torch.tensor(pad, device="cuda")
            att = torch.tensor(mask, device="cuda")
            budget = min(args.max_new_tokens, ctx - width)
            gen = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=budget, do_sample=False,
                                 pad_token_id=eot, eos_token_id=stop_ids)
            for row in gen[:, width:].tolist():
                if eot in row:
                    row = row[:row.index(eot)]
                outs.append(enc.decode(row).split("\n")[0].strip())
        return outs

    results, examples = [], []
    rng = random.Random(args.seed)
    for en_fr in (True, False):
        direction = "en-fr" if en_fr else "fr-en"
        sources = (test_en if en_fr else test_fr)[:n]
        refs = (test_fr if en_fr else test_en)[:n]
        for k in [int(x) for x in args.shots.split(",")]:
            prompts = [prompt_of(rng.sample(dev, k), s, en_fr) for s in sources]
            seed_prompts = [prompt_of(rng.sample(dev, k), s, True) for s in SEED_PROMPTS] if en_fr else []
            start = time.time()
            hyps = generate(prompts + seed_prompts)
            seconds = time.time() - start
            name = f"{direction}_k{k}"
            hyp_path, ref_path = os.path.join(args.out, name + ".hyp"), os.path.join(args.out, name + ".ref")
            with open(hyp_path, "w", encoding="utf-8") as f:
                f.write("\n".join(hyps[:n]) + "\n")
            with open(ref_path, "w", encoding="utf-8") as f:
                f.write("\n".join(refs) + "\n")
            ours = json.loads(subprocess.run([args.flashgpt, "eval", "bleu", "--ref", ref_path, "--hyp", hyp_path, "--json"],
                                             check=True, capture_output=True, text=True).stdout)
            row = {"direction": direction, "shots": k, "sentences": n, "bleu": ours["bleu"], "chrf": ours["chrf"],
                   "signature": ours.get("signature"), "seconds": round(seconds, 1)}
            try:
                import sacrebleu
                row["sacrebleu_bleu"] = round(sacrebleu.corpus_bleu(hyps[:n], [refs]).score, 2)
                row["sacrebleu_chrf"] = round(sacrebleu.corpus_chrf(hyps[:n], [refs]).score, 2)
            except ImportError:
                pass
            results.append(row)
            for src, out in zip(SEED_PROMPTS, hyps[n:]):
                examples.append({"shots": k, "source": src, "output": out})
            print(json.dumps(row), flush=True)
            for i in range(2):
                print(f"  {sources[i][:80]!r} -> {hyps[i][:80]!r}", flush=True)
    for e in examples:
        print(f"  K={e['shots']} {e['source']!r} -> {e['output']!r}")
    with open(os.path.join(args.out, "translate.json"), "w", encoding="utf-8") as f:
        json.dump({"results": results, "seed_prompts": examples, "generator": "transformers GPT2LMHeadModel greedy, bf16"},
                  f, indent=1, ensure_ascii=False)
    print(f"{'direction':9} {'K':>2} {'BLEU':>6} {'chrF':>6}")
    for r in results:
        print(f"{r['direction']:9} {r['shots']:>2} {r['bleu']:>6} {r['chrf']:>6}")


if __name__ == "__main__":
    main()
