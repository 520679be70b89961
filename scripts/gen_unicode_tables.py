#!/usr/bin/env python3
"""Generates src/common/unicode_tables.cc: the Unicode classes that tiktoken's patterns use.

The pretokenizer needs, for every code point, whether it is a letter (\\p{L}), a number
(\\p{N}), a mark (\\p{M}), White_Space (Rust's \\s), and o200k's two case classes
[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}] ("upper") and [\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}] ("lower").
The data comes from the `regex` module (a newer Unicode than `unicodedata`, closer to the
Rust regex crate inside tiktoken); with --source unicodedata it comes from the standard
library instead. The output is a list of ranges [first, next first) with one flags byte;
the tests against the real tiktoken are the judge of whether the tables are right.

The `regex` module may know a newer Unicode than tiktoken's Rust regex crate (here regex
2026.5 has Unicode 17, tiktoken 0.14 an older one), and no Unicode data file of the exact
older version is at hand. So, with --tiktoken-vocab-dir, every code point that `regex`
assigns but `unicodedata` (Unicode 14) does not (the ones added since) is probed with the
real tiktoken: if tiktoken treats it as unassigned, its flags are dropped. The probes:
cl100k splits CH + "'s" as [CH]['s] when CH is a letter or number and as [CH'][s] otherwise;
o200k keeps CH + "'s" in one piece when CH is a mark.

Re-run: python3 scripts/gen_unicode_tables.py --tiktoken-vocab-dir ../shared/data/tokenizers \
            > src/common/unicode_tables.cc
"""
import argparse
import sys
import unicodedata

FLAG_LETTER, FLAG_NUMBER, FLAG_MARK, FLAG_SPACE, FLAG_UPPER, FLAG_LOWER = 1, 2, 4, 8, 16, 32
MAX_CODE_POINT = 0x110000


def flags_from_regex():
    import regex

    chars = "".join(chr(c) if not 0xD800 <= c < 0xE000 else "\0" for c in range(MAX_CODE_POINT))
    flags = bytearray(MAX_CODE_POINT)
    classes = [
        (r"\p{L}+", FLAG_LETTER),
        (r"\p{N}+", FLAG_NUMBER),
        (r"\p{M}+", FLAG_MARK),
        (r"\p{White_Space}+", FLAG_SPACE),
        (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+", FLAG_UPPER),
        (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]+", FLAG_LOWER),
    ]
    for pattern, flag in classes:
        for m in regex.finditer(pattern, chars):
            for c in range(m.start(), m.end()):
                if not 0xD800 <= c < 0xE000:
                    flags[c] |= flag
    return flags, f"regex {regex.__version__}"


def flags_from_unicodedata():
    # White_Space is not in unicodedata; this is the full (stable) list of the property.
    white_space = set(range(0x09, 0x0E)) | {0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}
    white_space |= set(range(0x2000, 0x200B))
    flags = bytearray(MAX_CODE_POINT)
    for c in range(MAX_CODE_POINT):
        cat = unicodedata.category(chr(c))
        f = 0
        if cat[0] == "L":
            f |= FLAG_LETTER
        if cat[0] == "N":
            f |= FLAG_NUMBER
        if cat[0] == "M":
            f |= FLAG_MARK
        if cat in ("Lu", "Lt", "Lm", "Lo") or cat[0] == "M":
            f |= FLAG_UPPER
        if cat in ("Ll", "Lm", "Lo") or cat[0] == "M":
            f |= FLAG_LOWER
        if c in white_space:
            f |= FLAG_SPACE
        flags[c] = f
    return flags, f"unicodedata {unicodedata.unidata_version}"


def drop_unknown_to_tiktoken(flags, vocab_dir):
    """Clears the flags of recently added code points that tiktoken does not know yet."""
    import json

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    def encoding(name):
        meta = json.load(open(f"{vocab_dir}/{name}.meta.json"))
        ranks = load_tiktoken_bpe(f"{vocab_dir}/{name}.tiktoken")
        return tiktoken.Encoding(name=name, pat_str=meta["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=meta["special_tokens"])

    cl100k, o200k = encoding("cl100k_base"), encoding("o200k_base")
    cl_s, o_s = cl100k.encode_single_token("s"), o200k.encode_single_token("s")
    dropped = []
    for c in range(MAX_CODE_POINT):
        if not flags[c] or 0xD800 <= c < 0xE000 or unicodedata.category(chr(c)) != "Cn":
            continue
        if flags[c] & (FLAG_LETTER | FLAG_NUMBER):
            known = cl100k.encode_ordinary(chr(c) + "'s")[-1] != cl_s
        elif flags[c] & FLAG_MARK:
            known = o200k.encode_ordinary(chr(c) + "'s")[-1] != o_s
        else:
            continue
        if not known:
            dropped.append(c)
            flags[c] = 0
    return dropped, tiktoken.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["regex", "unicodedata"], default="regex")
    parser.add_argument("--tiktoken-vocab-dir", help="probe new code points with tiktoken (rank files here)")
    args = parser.parse_args()
    flags, source = flags_from_regex() if args.source == "regex" else flags_from_unicodedata()
    if args.tiktoken_vocab_dir:
        dropped, version = drop_unknown_to_tiktoken(flags, args.tiktoken_vocab_dir)
        source += f", less {len(dropped)} code points unknown to tiktoken {version}"
    ranges = []
    for c in range(MAX_CODE_POINT):
        if not ranges or ranges[-1][1] != flags[c]:
            ranges.append((c, flags[c]))
    out = sys.stdout
    out.write("// Generated by scripts/gen_unicode_tables.py from " + source + "; do not edit.\n")
    out.write("// Ranges of code points with the same class flags, in order: range i covers\n")
    out.write("// [kUnicodeRanges[i].first, kUnicodeRanges[i + 1].first).\n")
    out.write('#include <flashgpt/unicode.h>\n\nnamespace flashgpt::unicode {\n\n')
    out.write(f"const UnicodeRange kUnicodeRanges[] = {{\n")
    line = "   "
    for first, f in ranges:
        item = f" {{0x{first:X}, {f}}},"
        if len(line) + len(item) > 100:
            out.write(line + "\n")
            line = "   "
        line += item
    out.write(line + "\n};\n")
    out.write("const size_t kUnicodeRangeCount = sizeof(kUnicodeRanges) / sizeof(kUnicodeRanges[0]);\n")
    out.write(f'const char kUnicodeTableSource[] = "{source}";\n\n}}  // namespace flashgpt::unicode\n')


if __name__ == "__main__":
    main()
