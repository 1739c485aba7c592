"""Our tokenizer against Hugging Face `tokenizers` (the Rust implementation) on ≥ 10,000 lines.

Four tokenizers: two trained here with `tokenizers` on the test's own corpus — a byte-level BPE with
the LLaMA-3 split regex, and a SentencePiece-style BPE ("▁", byte fallback) — each with special
tokens; and the real LLaMA 3 (128k) and LLaMA 2 (32k) vocabularies from shared/fixtures, loaded by
HF as the reference. For every line: ids equal, character offsets equal (the chat masks rest on
them), decode(encode(s)) == s, and our decode equals HF's."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tokenizer_corpus import corpus  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "tokenizers"
LORANULL = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin")) / "loranull"
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def train_byte_level(lines):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=SPECIALS3, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines[::2], trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return tok


def train_sentencepiece(lines):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # a small alphabet, so that rarer characters (CJK, emoji, …) go through byte fallback
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  limit_alphabet=120, max_token_length=12, show_progress=False)
    tok.train_from_iterator(lines[::2], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.fixture(scope="module")
def lines():
    ls = corpus(10500)
    assert len(ls) >= 10000
    return ls


def ours(model_dir, tmp_path, lines, add_special):
    inp = tmp_path / ("in_special.jsonl" if add_special else "in.jsonl")
    inp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in lines), encoding="utf-8")
    cmd = [str(LORANULL), "tokenize", "--model", str(model_dir), "--encode", str(inp), "--decode"]
    if add_special:
        cmd.append("--add-special")
    r = subprocess.run(cmd, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    out = [json.loads(x) for x in r.stdout.decode("utf-8").split("\n")[:-1]]
    assert len(out) == len(lines)
    return out


def char_offsets(s, byte_offsets):
    """Our byte offsets -> character offsets (HF counts characters)."""
    b2c, b = {}, 0
    for i, ch in enumerate(s):
        b2c[b] = i
        b += len(ch.encode("utf-8"))
    b2c[b] = len(s)
    return [(b2c[byte_offsets[k]], b2c[byte_offsets[k + 1]]) for k in range(0, len(byte_offsets), 2)]


def compare(hf, model_dir, tmp_path, lines, roundtrip_required=True):
    """decode(encode(s)) == s is required of every line without an added token in it: around one,
    a SentencePiece-style normalizer prepends "▁" to the following text (HF does the same)."""
    mine = ours(model_dir, tmp_path, lines, add_special=False)
    added = [t.content for t in hf.get_added_tokens_decoder().values()]
    bad = []
    roundtrips = 0
    for s, m in zip(lines, mine):
        roundtrip = roundtrip_required and not any(a in s for a in added)
        roundtrips += roundtrip
        enc = hf.encode(s, add_special_tokens=False)
        if m["ids"] != enc.ids:
            bad.append(("ids", s, enc.ids, m["ids"]))
            continue
        if char_offsets(s, m["offsets"]) != [tuple(o) for o in enc.offsets]:
            bad.append(("offsets", s, enc.offsets, m["offsets"]))
        if m["text"] != hf.decode(enc.ids, skip_special_tokens=False):
            bad.append(("decode", s, hf.decode(enc.ids, skip_special_tokens=False), m["text"]))
        if roundtrip and m["text"] != s:
            bad.append(("roundtrip", s, s, m["text"]))
    assert not bad, f"{len(bad)} mismatches of {len(lines)}; first: {bad[:3]}"
    assert roundtrips > 0.8 * len(lines) or not roundtrip_required
    # with the post-processor's tokens (BOS), on a part of the corpus
    part = lines[:800]
    mine = ours(model_dir, tmp_path, part, add_special=True)
    for s, m in zip(part, mine):
        assert m["ids"] == hf.encode(s).ids, s
    return len(lines)


def test_trained_byte_level_bpe(tmp_path, lines):
    hf = train_byte_level(lines)
    d = tmp_path / "bl"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    assert compare(hf, d, tmp_path, lines) >= 10000
    # the specials are matched before BPE, inside text too
    ids = ours(d, tmp_path, ["x<|eot_id|>y"], False)[0]["ids"]
    assert hf.token_to_id("<|eot_id|>") in ids


def test_trained_sentencepiece_bpe_with_byte_fallback(tmp_path, lines):
    hf = train_sentencepiece(lines)
    d = tmp_path / "sp"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    assert compare(hf, d, tmp_path, lines) >= 10000
    fallback = sum(any(3 <= i < 259 for i in hf.encode(s).ids) for s in lines)
    assert fallback > 500, "the corpus should exercise byte fallback"


def test_added_token_flags_lstrip_rstrip_single_word(tmp_path, lines):
    """HF AddedToken flags: lstrip/rstrip swallow neighbouring whitespace, single_word only matches
    between non-word characters."""
    import random
    from tokenizers import AddedToken
    hf = train_byte_level(lines[:3000])
    hf.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True), AddedToken("word", single_word=True),
                   AddedToken("<l>", lstrip=True), AddedToken("<r>", rstrip=True)])
    d = tmp_path / "flags"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    rng = random.Random(3)
    pieces = ["<mask>", "word", "words", "sword", " ", "  ", "\t", "\n", "<l>", "<r>", "a", "日本", ".", "1"]
    cases = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    compare(hf, d, tmp_path, cases, roundtrip_required=False)


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_normalized_added_tokens(tmp_path, lines, family):
    """Added tokens with normalized=true (HF's default for non-special ones) are matched in the
    normalized text, after the normalizer — e.g. "▁bar" in LLaMA-2-style text."""
    import random
    hf = (train_byte_level if family == "byte_level" else train_sentencepiece)(lines[:3000])
    hf.add_tokens(["hello world", "foo", "▁bar", "ba"])
    d = tmp_path / "norm"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    rng = random.Random(4)
    pieces = ["hello", " ", "world", "foo", "bar", " bar", "ba", "r", "<s>", "▁", "日本", "x"]
    cases = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) for _ in range(3000)]
    assert sum(hf.token_to_id("▁bar") in hf.encode(c).ids for c in cases) > 50 or family == "byte_level"
    compare(hf, d, tmp_path, cases, roundtrip_required=False)


@pytest.mark.parametrize("prefix", [False, True])
def test_trained_gpt2_style_byte_level(tmp_path, lines, prefix):
    """ByteLevel with its own GPT-2 split pattern (use_regex), with and without add_prefix_space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines[:4000], trainer)
    d = tmp_path / "gpt2"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    compare(tok, d, tmp_path, lines, roundtrip_required=not prefix)


def test_split_then_byte_level_with_prefix_space(tmp_path, lines):
    """add_prefix_space on a ByteLevel that follows a Split acts on every piece of the split."""
    hf = train_byte_level(lines[:3000])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=False)])
    d = tmp_path / "pieces"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    compare(hf, d, tmp_path, lines, roundtrip_required=False)


@pytest.mark.parametrize("scheme,split", [("first", False), ("always", True), ("never", False)])
def test_trained_bpe_with_metaspace_pre_tokenizer(tmp_path, lines, scheme, split):
    """The other way LLaMA-2 tokenizer.json files spell "▁": a Metaspace pre-tokenizer instead of the
    normalizer (prepend_scheme first/always/never, split or not). Around leading spaces these do not
    round-trip in HF either, so only equality with HF is required here."""
    hf = train_sentencepiece(lines[:3000])
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    if split:
        hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    d = tmp_path / "meta"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    assert compare(hf, d, tmp_path, lines, roundtrip_required=False) >= 10000


@pytest.mark.parametrize("name", ["llama3", "llama2"])
def test_real_llama_vocabularies(tmp_path, lines, name):
    path = FIXTURES / name / "tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    hf = Tokenizer.from_file(str(path))
    assert compare(hf, path.parent, tmp_path, lines) >= 10000


@pytest.mark.parametrize("name", ["llama3", "llama2"])
def test_fixture_expected_ids_from_independent_implementation(tmp_path, name):
    path = FIXTURES / name
    if not (path / "expected-js.json").exists():
        pytest.skip("fixture missing")
    cases = json.loads((path / "expected-js.json").read_text())
    mine = ours(path, tmp_path, [c["text"] for c in cases], False)
    for c, m in zip(cases, mine):
        assert m["ids"] == c["ids"], c["text"]


def test_default_tokenizer_loads_in_hf(tmp_path):
    """ln_tokenizer_make_default's file (what `loranull model new` writes) must be a tokenizer.json
    that HF reads and that encodes like ours."""
    out = tmp_path / "default"
    out.mkdir()
    r = subprocess.run([str(LORANULL), "tokenize", "--new-tokenizer", str(out / "tokenizer.json"),
                        "--vocab-size", "1000"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    size = hf.get_vocab_size()
    assert 266 < size <= 1000
    assert hf.token_to_id("<|begin_of_text|>") == size - 10
    assert hf.token_to_id("<|eot_id|>") == size - 1
    assert len(hf.encode("The quick brown fox").ids) <= 5  # merges were learnt
    compare(hf, out, tmp_path, corpus(600, seed=5))
