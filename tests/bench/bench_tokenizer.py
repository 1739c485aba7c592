"""Tokenizer throughput: loranull vs Hugging Face `tokenizers` (Rust), single thread, same corpus.

Corpus: tests/reference/tokenizer_corpus.py (60,000 lines, ~4 MB, many scripts, emoji, code,
whitespace runs). Tokenizers: the real LLaMA 3 and LLaMA 2 vocabularies from shared/fixtures.
Ours: `loranull tokenize --encode FILE --time` (times the encoder alone, after JSON parsing,
no offsets). HF: `Tokenizer.encode_batch_fast` (no offsets either) with Rayon held to one thread.
Both must give the same number of tokens. One run each. Prints a table and writes it into
tests/bench/RESULTS.md (replacing this benchmark's previous section)."""
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["RAYON_NUM_THREADS"] = "1"

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "reference"))
from tokenizer_corpus import corpus  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "tokenizers"
LORANULL = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin")) / "loranull"
RESULTS = ROOT / "tests" / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench_tokenizer: begin -->", "<!-- bench_tokenizer: end -->"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    import tokenizers
    from tokenizers import Tokenizer

    lines = corpus(60000, seed=99)
    nbytes = sum(len(s.encode("utf-8")) for s in lines)
    work = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"ln_bench_tok_{os.getpid()}.jsonl"
    work.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in lines), encoding="utf-8")
    rows = []
    try:
        for name in ["llama3", "llama2"]:
            path = FIXTURES / name
            if not (path / "tokenizer.json").exists():
                print(f"skip {name}: {path} missing")
                continue
            r = subprocess.run([str(LORANULL), "tokenize", "--model", str(path), "--encode", str(work), "--time"],
                               capture_output=True, text=True, check=True)
            mine = json.loads(r.stderr.strip().splitlines()[-1])
            hf = Tokenizer.from_file(str(path / "tokenizer.json"))
            encode = getattr(hf, "encode_batch_fast", hf.encode_batch)
            t0 = time.perf_counter()
            encs = encode(lines, add_special_tokens=False)
            hf_s = time.perf_counter() - t0
            hf_tokens = sum(len(e.ids) for e in encs)
            assert hf_tokens == mine["tokens"], f"{name}: token counts differ ({hf_tokens} vs {mine['tokens']})"
            ours_mbs = nbytes / mine["seconds"] / 1e6
            hf_mbs = nbytes / hf_s / 1e6
            rows.append((name, mine["tokens"], ours_mbs, hf_mbs, ours_mbs / hf_mbs))
    finally:
        work.unlink(missing_ok=True)

    table = ["| tokenizer | tokens | loranull MB/s | HF tokenizers MB/s | ratio |", "|---|---|---|---|---|"]
    table += [f"| {n} | {t:,} | {a:.1f} | {b:.1f} | {x:.2f}× |" for n, t, a, b, x in rows]
    section = "\n".join([
        BEGIN,
        "## Tokenizer throughput (bench_tokenizer.py)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_name()} "
        f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} while measuring), one thread each, one run; "
        f"corpus: {len(lines):,} lines, {nbytes / 1e6:.2f} MB (tests/reference/tokenizer_corpus.py, seed 99). "
        f"loranull: `loranull tokenize --encode --time` (encoder only); HF: tokenizers {tokenizers.__version__} "
        "`encode_batch_fast`, Rayon at 1 thread. Same token counts checked. Goal: ratio ≥ 1×.",
        "",
        *table,
        END,
    ])
    print(section)
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(new)


if __name__ == "__main__":
    main()
