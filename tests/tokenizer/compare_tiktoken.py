#!/usr/bin/env python3
"""Compares flashgpt's tokenizer with the real tiktoken, id for id.

For each encoding it builds a tiktoken.Encoding from the shared rank file and meta.json (no
network), writes the test texts to a directory, runs tiktoken_driver (the C++ API) on them
and compares: every id identical, tiktoken decodes our ids back to the text, the same
errors for disallowed special tokens, and the driver's own checks (decode, streaming
decode, parallel and batch encoding). Texts: every WMT14 file of ../shared/data/wmt14
(--wmt-bytes caps each), hand-written adversarial texts, seeded random fuzz and, with
--all-code-points, every Unicode scalar value in several contexts.

With --patterns tiktoken it uses tiktoken's own pattern strings (tiktoken_ext) instead of
the meta.json ones. Exits 1 on any difference, and when tiktoken cannot be imported.
"""
import argparse
import json
import lzma
import os
import random
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import data_skip  # noqa: E402

ENCODINGS = ["r50k_base", "cl100k_base", "o200k_base"]


def encoding_build(tiktoken, vocab_dir, name, patterns):
    from tiktoken.load import load_tiktoken_bpe

    meta = json.loads((vocab_dir / f"{name}.meta.json").read_text())
    pat_str = meta["pat_str"] if patterns == "meta" else tiktoken_pattern(name)
    ranks = load_tiktoken_bpe(str(vocab_dir / f"{name}.tiktoken"))
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=meta["special_tokens"])


def tiktoken_pattern(name):
    import tiktoken_ext.openai_public as public

    saved = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *args, **kwargs: {}
    try:
        return getattr(public, name)()["pat_str"]
    finally:
        public.load_tiktoken_bpe = saved


def adversarial_texts():
    """Hand-written texts aimed at the pretokenizer's corners."""
    t = {}
    t["scripts"] = (
        "Größe straße ÉCOLE naïve façade. Ελληνικά κείμενα ΑΒΓ. Русский ТЕКСТ ёж. عربي النص ١٢٣٤. עברית טקסט. "
        "हिन्दी पाठ क्षत्रिय. தமிழ் உரை. ภาษาไทย ข้อความ. 中文文本测试。日本語のテキスト、カタカナ。한국어 텍스트 "
        "ქართული Հայերեն ግዕዝ ᎠᏍᎦᏯ ᚠᚢᚦ 𐌰𐌱𐌲 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟏𝟐𝟑"
    )
    t["emoji"] = (
        "family 👨‍👩‍👧‍👦 flags 🇫🇷🇺🇸🇯🇵 tones 👍🏽👋🏿 keycap 1️⃣#️⃣ vs ❤️☺︎ rainbow 🏳️‍🌈 "
        "🧑🏻‍🤝‍🧑🏾 tags 🏴󠁧󠁢󠁳󠁣󠁴󠁿 🙂🙂🙂!!"
    )
    t["combining"] = (
        "e\u0301 a\u0308\u0304 \u0301start \u0301\u0302\u0303 x\u20dd Z\u0351\u0362\u0329a\u0315l\u0322g\u0327o "
        "\u0915\u094d\u0937 \u093f\u0915 n\u0303o\u0303 A\u030a'S \u0301's \u0300\u0300abc ABC\u0301def"
    )
    t["crlf"] = "line one\r\nline two\r\n\r\n\r\nthree\r\r\n\n four \r\n  \r\n\tfive\r\n"
    t["crlf_end"] = "end with newline and spaces\n  "
    t["crlf_end2"] = "a\r\n \t \n"
    t["spaces"] = "a  b   c    d\t\te \t f\n\n\ng \n \n h  \n  i     "
    t["unicode_spaces"] = "a\u00a0b\u3000c\u2028d\u2029e\u0085f\u000bg\u000ch\u1680i\u2009j\u200bk\u202f l\u205fm\ufeffn"
    t["not_spaces"] = "a\x1cb\x1dc\x1ed\x1fe \x1c \x1f x\u180ey\u200bz"
    t["controls"] = "\x00\x01\x02 abc\x7f\x08 \x1b[31mred\x1b[0m"
    t["digits"] = "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 0x1F 2024-11-24 ١٢٣٤٥ ０１２３４ ²³ ⅫⅣ ½¾ 𝟙𝟚𝟛𝟜"
    t["contractions"] = (
        "I'm you're we'll it's they've he'd I'M YOU'RE WE'LL IT'S THEY'VE HE'D i'Ll We'Re "
        "don’t it’s ‘quoted’ 's 'S ''s '''re 'sup 'llama 'x x' ' ' a's b'T c'rE 'ſ x'ſ A'ſ"
    )
    t["mixed_case"] = "HelloWorld HTTPServer iPhone camelCaseWord SCREAMING_CASE ǅemal ǈubljana ʰello ᵃbc Σίσυφος ΣΊΣΥΦΟΣ"
    t["punctuation"] = "Hello, world! ... ?!?! --- (a) [b] {c} <d> \"e\" 'f' a/b/c //\n/\r\n ::= => -> @#$%^&*"
    t["urls"] = "https://example.com/path/to/file.html?query=1&b=2#frag /usr/bin/env python3 C:\\Windows\\System32"
    t["code"] = "def f(x):\n    return x ** 2  # square\n\n\tif (a && b) { c++; }\n    \n}\n"
    t["long_same_letter"] = "a" * 50000
    t["long_same_letter_upper"] = "A" * 20000 + "b" * 20000
    rng = random.Random(1234)
    t["long_random_letters"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(50000))
    t["long_random_mixed_case"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(20000))
    t["long_digits"] = "".join(rng.choice("0123456789") for _ in range(20000))
    t["long_punct"] = "".join(rng.choice("!@#$%^&*()-=+[]{};:,.<>/?") for _ in range(20000))
    t["long_spaces"] = " " * 10000 + "x" + "\n" * 5000 + "y" + " \t\n" * 3000
    t["long_cjk"] = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(10000))
    t["long_emoji"] = "👍🏽" * 3000 + "🇫🇷" * 2000
    t["long_base64"] = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(30000))
    t["long_accented"] = "é" * 10000 + "ñ" * 10000
    t["empty"] = ""
    t["single_space"] = " "
    t["single_newline"] = "\n"
    t["specials_as_text"] = "a <|endoftext|> b <|fim_prefix|><|endofprompt|> <|notaspecial|> <|endoftext"
    return t


def fuzz_texts(count, seed):
    """Random strings from a pool that exercises every class boundary of the patterns."""
    pool = (
        list("aAzZsStTdDmMlLrReEvV") + list("0189") + [" ", " ", " ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u3000"]
        + list("'’/.,!?-_\"()") + ["é", "É", "ß", "ǅ", "ʰ", "ſ", "漢", "ア", "한", "ع", "א", "Σ", "σ"]
        + ["\u0301", "\u0308", "\u093f", "\u094d", "क", "٣", "½", "Ⅻ", "²", "👍", "🏽", "\u200d", "🇫", "🇷", "\ufe0f"]
        + ["'s", "'S", "'ll", "'LL", "'re", "'Ve", "'d", "'m", "'t"]
    )
    rng = random.Random(seed)
    texts = {}
    for i in range(count):
        n = rng.randrange(1, 60)
        texts[f"fuzz_{i:04d}"] = "".join(rng.choice(pool) for _ in range(n))
    return texts


def seam_texts(count, seed):
    """Prose of blank lines, CRLF, runs of spaces and tabs, digits, ASCII and accented
    letters and punctuation: the driver encodes each on 1 to 16 threads with chunks forced
    small, so these check parallel == serial == tiktoken at every kind of seam."""
    parts = (["\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", " ", "  ", "   ", "\t", "\t\t", " \t ", " \n",
              "  \n\n", "\t\r\n", "0", "7", "42", "123", "2014", "1234567"]
             + ["a", "x", "the", "Word", "HTTP", "camelCase", "été", "Ça", "naïve", "œuvre", "ÉCOLE", "déjà", "à", "."]
             + [",", "!", "?", "...", "--", "(", ")", '"', "'", "'s", "'ll", "'RE", "’", "«", "»", "/", "//", "\u00a0",
                "\u2003", "中", "🙂"])
    words = parts[21:35]
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        pieces, size, target = [], 0, rng.randrange(0, 4000 if i % 8 == 0 else 400)
        while size < target:
            if rng.randrange(40) == 0:  # a long line, then one or two line breaks
                piece = " ".join(rng.choice(words) for _ in range(rng.randrange(20, 80))) + rng.choice(["\n", "\n\n"])
            else:
                piece = rng.choice(parts)
            pieces.append(piece)
            size += len(piece.encode())
        out[f"seam_{i:04d}"] = "".join(pieces)
    return out


def random_unicode_texts(count, seed):
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        chars = []
        for _ in range(rng.randrange(1, 40)):
            c = rng.randrange(0, 0x110000) if rng.random() < 0.5 else rng.randrange(0, 0x3000)
            if 0xD800 <= c < 0xE000:
                c = 0x20
            chars.append(chr(c))
        out[f"unicode_{i:04d}"] = "".join(chars)
    return out


def all_code_point_texts():
    """Every scalar value after a letter, after a space, before a letter, digit and newline."""
    out = {}
    step = 0x8000
    for base in range(0, 0x110000, step):
        parts = []
        for c in range(base, min(base + step, 0x110000)):
            if 0xD800 <= c < 0xE000:
                continue
            ch = chr(c)
            parts.append(f"x{ch}a {ch}'s{ch}1\n{ch}{ch}A\t")
        out[f"codepoints_{base:06x}"] = "".join(parts)
    return out


def invalid_utf8_cases():
    return {
        "invalid_lone_continuation": b"abc\x80def",
        "invalid_truncated_3": b"caf\xe2\x82 ok",
        "invalid_surrogate": b"x\xed\xa0\x80y",
        "invalid_overlong": b"\xc0\xaf\xe0\x80\xaf z",
        "invalid_f5_ff": b"\xf5\xff\xfe a",
        "invalid_truncated_end": b"end \xf0\x9f\x98",
        "invalid_mixed": "héllo ".encode() + b"\xc3" + " wörld \u2603 ".encode() + b"\xf4\x90\x80\x80 x",
    }


def wmt_texts(data_dir, max_bytes):
    out = {}
    for path in sorted((data_dir / "wmt14").glob("*.xz")):
        raw = lzma.decompress(path.read_bytes())
        if max_bytes:
            raw = raw[:max_bytes]
            raw = raw[: len(raw.decode("utf-8", errors="ignore").encode())]  # whole characters
        out["wmt_" + path.name[: -len(".xz")]] = raw.decode("utf-8")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", required=True, help="path to tiktoken_driver")
    parser.add_argument("--tokenizer-dir", "--vocab-dir", dest="vocab_dir", type=Path,
                        default=os.environ.get("FLASHGPT_TOKENIZER_DIR"))
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("FLASHGPT_DATA_DIR"))
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--patterns", choices=["meta", "tiktoken"], default="meta")
    parser.add_argument("--wmt-bytes", type=int, default=0, help="cap each WMT14 file (0: whole files)")
    parser.add_argument("--fuzz", type=int, default=300)
    parser.add_argument("--all-code-points", action="store_true")
    parser.add_argument("--no-adversarial", action="store_true")
    args = parser.parse_args()
    try:
        import tiktoken
    except ImportError as e:
        print(f"FAIL: cannot import tiktoken ({e}); scripts/install-deps.sh installs it", file=sys.stderr)
        return 1
    if args.data_dir is None:
        args.data_dir = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if args.vocab_dir is None:
        args.vocab_dir = args.data_dir / "tokenizers"
    if not data_skip.tokenizer_dir_usable(args.vocab_dir):
        data_skip.exit_missing(f"{data_skip.TOKENIZER_MISSING} (looked in {args.vocab_dir})")

    texts = {}
    if not args.no_adversarial:
        texts.update(adversarial_texts())
        texts.update(fuzz_texts(args.fuzz, seed=7))
        texts.update(random_unicode_texts(args.fuzz // 3, seed=11))
        texts.update(seam_texts(args.fuzz, seed=13))
    if (args.data_dir / "wmt14").is_dir():
        texts.update(wmt_texts(args.data_dir, args.wmt_bytes))
    else:
        data_skip.exit_missing(f"{data_skip.SHARED_DATA_MISSING} (looked in {args.data_dir})")
    if args.all_code_points:
        texts.update(all_code_point_texts())
    invalid = {} if args.no_adversarial else invalid_utf8_cases()

    failures = 0
    with tempfile.TemporaryDirectory(prefix="flashgpt-tiktoken-") as tmp:
        tmp = Path(tmp)
        cases = []  # (file, mode, bytes, expected-text-for-tiktoken)
        for name, text in texts.items():
            cases.append((name, "ordinary", text.encode("utf-8", errors="surrogatepass"), text))
        for name, raw in invalid.items():
            cases.append((name, "replace", raw, raw.decode("utf-8", errors="replace")))
            cases.append((name + "_strict", "ordinary", raw, None))
        special_text = adversarial_texts()["specials_as_text"] if not args.no_adversarial else None
        if special_text:
            for mode in ("special_all", "special_none"):
                cases.append(("specials_" + mode, mode, special_text.encode(), special_text))
            cases.append(("specials_absent_none", "special_none", b"no specials here <| endoftext |>", "no specials here <| endoftext |>"))
        for name, mode, raw, _ in cases:
            (tmp / name).write_bytes(raw) if not (tmp / name).exists() else None
        # Distinct files per case: modes of one text share the file.
        manifest = [{"file": name, "mode": mode} for name, mode, _, _ in cases]
        (tmp / "manifest.json").write_text(json.dumps(manifest))

        for enc_name in args.encodings.split(","):
            vocab_dir = args.vocab_dir
            if args.patterns == "tiktoken":
                vocab_dir = tmp / "vocab_tiktoken_patterns"
                vocab_dir.mkdir(exist_ok=True)
                link = vocab_dir / f"{enc_name}.tiktoken"
                if not link.exists():
                    link.symlink_to((args.vocab_dir / f"{enc_name}.tiktoken").resolve())
                meta = json.loads((args.vocab_dir / f"{enc_name}.meta.json").read_text())
                meta["pat_str"] = tiktoken_pattern(enc_name)
                (vocab_dir / f"{enc_name}.meta.json").write_text(json.dumps(meta))
            enc = encoding_build(tiktoken, args.vocab_dir, enc_name, args.patterns)
            run = subprocess.run([args.driver, enc_name, str(vocab_dir), str(tmp)], capture_output=True, text=True)
            if run.returncode != 0:
                print(f"FAIL {enc_name}: driver exited {run.returncode}: {run.stderr}")
                failures += 1
                continue
            results = json.loads((tmp / f"results.{enc_name}.json").read_text())
            enc_failures = 0
            for (name, mode, raw, text), result in zip(cases, results):
                ids = array("I")
                ids.frombytes((tmp / f"{name}.{enc_name}.ids").read_bytes())
                if sys.byteorder != "little":
                    ids.byteswap()
                ids = ids.tolist()
                problem = None
                if text is None:  # strict mode on invalid UTF-8: must be an error naming the offset
                    if not result["error"] or "byte offset" not in result["error"]:
                        problem = f"expected an invalid-UTF-8 error, got {result['error']!r}"
                elif mode == "special_none" and "<|endoftext|>" in text:
                    try:
                        enc.encode(text)
                        problem = "tiktoken accepted the text?"
                    except ValueError as e:
                        named = str(e).split("'")[1]  # tiktoken: "... disallowed special token '<|x|>'. ..."
                        if not result["error"] or named not in result["error"]:
                            problem = f"expected an error naming {named}, got {result['error']!r}"
                else:
                    if mode == "special_all":
                        expected = enc.encode(text, allowed_special="all")
                    elif mode == "special_none":
                        expected = enc.encode(text)
                    else:
                        expected = enc.encode_ordinary(text)
                    if result["error"]:
                        problem = f"error: {result['error']}"
                    elif ids != expected:
                        i = next((k for k in range(min(len(ids), len(expected))) if ids[k] != expected[k]), None)
                        if i is None:
                            i = min(len(ids), len(expected))
                        ctx = lambda seq: [enc.decode_single_token_bytes(t) for t in seq[max(0, i - 3) : i + 4]]
                        problem = (f"ids differ at token {i} (ours {len(ids)}, tiktoken {len(expected)}): "
                                   f"ours {ctx(ids)} tiktoken {ctx(expected)}")
                    elif enc.decode_bytes(ids) != text.encode("utf-8", errors="surrogatepass"):
                        problem = "tiktoken's decode of our ids is not the text"
                    elif result["failed_checks"]:
                        problem = "self-checks failed: " + ", ".join(result["failed_checks"])
                if problem:
                    enc_failures += 1
                    if enc_failures <= 20:
                        print(f"FAIL {enc_name} {name} [{mode}]: {problem}")
            total_bytes = sum(len(raw) for _, _, raw, _ in cases)
            print(f"{enc_name} ({args.patterns} pattern): {len(cases) - enc_failures}/{len(cases)} cases identical "
                  f"({total_bytes / 1e6:.1f} MB)")
            failures += enc_failures
    print("OK" if failures == 0 else f"{failures} FAILURES")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
