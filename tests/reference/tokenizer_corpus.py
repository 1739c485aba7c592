"""A deterministic text corpus for tokenizer tests and benchmarks: several scripts, emoji (with
ZWJ sequences and flags), digits, whitespace runs (spaces, tabs, CR/LF, NBSP, ideographic space),
code, contractions in both cases, empty strings and special-token look-alikes."""
import random

WORDS = {
    "en": "the quick brown fox jumps over a lazy dog while people talk about science history music and code".split(),
    "de": "Grüße aus München über die Straße schön Größe Äpfel Öl".split(),
    "fr": "déjà vu naïve façade œuvre été où garçon".split(),
    "ru": "Привет мир как дела это тест русского языка".split(),
    "el": "Καλημέρα κόσμε αυτό είναι ελληνικά".split(),
    "ar": "مرحبا بالعالم هذا اختبار للغة العربية".split(),
    "he": "שלום עולם זה מבחן".split(),
    "hi": "नमस्ते दुनिया यह एक परीक्षण है".split(),
    "zh": "你好 世界 这是 一个 中文 测试 句子".split(),
    "ja": "こんにちは 世界 日本語 の テキスト カタカナ".split(),
    "ko": "안녕하세요 세계 한국어 테스트".split(),
    "th": "สวัสดี ชาวโลก ภาษาไทย".split(),
    "emoji": ["🚀", "🔥", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "😀😃", "❤️", "✨"],
    "num": ["0", "7", "42", "1234567", "3.14159", "1,000,000", "١٢٣", "ⅷ", "²", "2026-11-28", "0x1F"],
    "punct": ["!", "?", "...", "—", "«", "»", "“", "”", "(", ")", "[", "]", "{", "}", ";", ":", "@", "#", "$", "%"],
    "contr": ["it's", "THEY'RE", "we've", "I'M", "you'll", "he'd", "don't", "Won'T", "'s", "'ſ"],
}
CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "int main(void) {\n\treturn 0;\n}\n",
    "for (i = 0; i < n; i++) { a[i] += b[i]; }",
    "if x != None and y >= 3:\n        pass",
    "<div class=\"x\">&nbsp;</div>",
    "SELECT * FROM t WHERE id = 42;",
]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "    \n", "\t\t"]
SPECIALISH = ["<|begin_of_text|>", "<|eot_id|>", "<s>", "</s>", "<|end", "<unk>", "< s>"]


def corpus(n=10500, seed=1234, specials=True):
    rng = random.Random(seed)
    lines = ["", " ", "\n", "  \t  ", "a", "Hello world!", "I'm   here\n\n\tok"]
    groups = list(WORDS)
    while len(lines) < n:
        kind = rng.random()
        if kind < 0.05:
            lines.append(rng.choice(CODE))
            continue
        if kind < 0.07:
            lines.append("".join(rng.choice(SPACES) for _ in range(rng.randint(1, 4))))
            continue
        parts = []
        for _ in range(rng.randint(1, 14)):
            g = rng.choice(groups)
            w = rng.choice(WORDS[g])
            if rng.random() < 0.1:
                w = w.upper()
            parts.append(w)
            parts.append(rng.choice(SPACES) if rng.random() < 0.15 else " ")
            if specials and rng.random() < 0.02:
                parts.append(rng.choice(SPECIALISH))
        if rng.random() < 0.3:
            parts.append(rng.choice(WORDS["punct"]))
        lines.append("".join(parts[:-1] if rng.random() < 0.7 else parts))
    return lines


if __name__ == "__main__":
    import json
    import sys
    for line in corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 10500):
        print(json.dumps(line, ensure_ascii=False))
