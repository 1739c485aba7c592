/* cmd_tokenize.c — `loranull tokenize`: what training would see, one JSON line per example.
 *
 *   loranull tokenize --model DIR --data FILE [--stats] [--chat-template llama3|llama2]
 *                     [--max-seq-len N] [--truncate] [--pack N]
 * prints {"input_ids":[…],"labels":[…]} per example (labels -100 where the loss is masked), or
 * with --stats one summary {"examples","tokens","trained_tokens","truncated"}. DIR needs only
 * tokenizer.json (and tokenizer_config.json, if any). --pack N prints instead the packed rows of
 * N tokens that packing would train on (file order, one pass; see ln_packed_row in data.h).
 *
 *   loranull tokenize --model DIR --encode FILE [--add-special] [--decode] [--time]
 * treats each line of FILE as a JSON string of raw text and prints {"ids":[…],"offsets":[…]}
 * (byte offsets), plus "text" (the ids decoded) with --decode. --time prints the encoding
 * throughput, measured around the tokenizer alone, to stderr (the benchmark uses it).
 *
 *   loranull tokenize --new-tokenizer FILE --vocab-size N
 * writes the built-in byte-level BPE tokenizer.json (ln_tokenizer_make_default). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/commands.h"
#include "worker/engine/data.h"
#include "worker/engine/tokenizer.h"

static void print_ids(FILE *f, const char *key, const int32_t *v, int n) {
    fprintf(f, "\"%s\":[", key);
    for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", v[i]);
    fputc(']', f);
}

/* Raw-text mode: one JSON string a line. */
static int encode_lines(const ln_tokenizer *tok, const char *path, int add_special, int decode, int timing,
                        ln_err *e) {
    char *buf;
    size_t size;
    if (ln_read_file(path, &buf, &size, e)) return -1;
    /* parse every line first, so --time measures the tokenizer and not JSON */
    json_t **lines = NULL;
    int n = 0, cap = 0, lineno = 0, rc = -1;
    for (size_t pos = 0; pos < size;) {
        const char *l = buf + pos, *nl = memchr(l, '\n', size - pos);
        size_t len = nl ? (size_t)(nl - l) : size - pos;
        pos += len + (nl != NULL);
        lineno++;
        json_error_t je;
        json_t *s = json_loadb(l, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
        if (!json_is_string(s)) {
            json_decref(s);
            ln_errf(e, "%s line %d: expected a JSON string of text", path, lineno);
            goto out;
        }
        if (n == cap) { cap = cap ? cap * 2 : 1024; lines = ln_xrealloc(lines, (size_t)cap * sizeof *lines); }
        lines[n++] = s;
    }
    ln_ids *ids = ln_xcalloc((size_t)(n ? n : 1), sizeof *ids), *offs = ln_xcalloc((size_t)(n ? n : 1), sizeof *offs);
    size_t bytes = 0;
    double t0 = ln_now_s();
    for (int i = 0; i < n; i++) {
        size_t len = json_string_length(lines[i]);
        bytes += len;
        ln_tokenizer_encode(tok, json_string_value(lines[i]), len, add_special, &ids[i], timing ? NULL : &offs[i], e);
    }
    double dt = ln_now_s() - t0;
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += ids[i].n;
    if (timing) {
        fprintf(stderr, "{\"lines\":%d,\"bytes\":%zu,\"tokens\":%lld,\"seconds\":%.6f,\"mb_per_s\":%.3f}\n", n, bytes,
                (long long)total, dt, dt > 0 ? (double)bytes / dt / 1e6 : 0.0);
    } else {
        for (int i = 0; i < n; i++) {
            fputc('{', stdout);
            print_ids(stdout, "ids", ids[i].ids, ids[i].n);
            fputc(',', stdout);
            print_ids(stdout, "offsets", offs[i].ids, offs[i].n);
            if (decode) {
                char *text;
                size_t tl;
                if (ln_tokenizer_decode(tok, ids[i].ids, ids[i].n, 0, &text, &tl, e) == 0) {
                    json_t *js = json_stringn(text, tl);
                    char *dump = json_dumps(js, JSON_ENCODE_ANY);
                    printf(",\"text\":%s", dump ? dump : "null");
                    free(dump);
                    json_decref(js);
                    free(text);
                }
            }
            fputs("}\n", stdout);
        }
    }
    for (int i = 0; i < n; i++) { ln_ids_free(&ids[i]); ln_ids_free(&offs[i]); }
    free(ids);
    free(offs);
    rc = 0;
out:
    for (int i = 0; i < n; i++) json_decref(lines[i]);
    free(lines);
    free(buf);
    return rc;
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *data = NULL, *encode = NULL, *tmpl = NULL, *new_tok = NULL;
    int vocab_size = 0, pack = 0, stats = 0, max_len = 0, truncate = 0, add_special = 0, decode = 0, timing = 0;
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "DIR holding tokenizer.json (and tokenizer_config.json)"},
        {"data", CLI_STR, &data, "JSONL file of examples (messages, prompt/completion, text, input_ids)"},
        {"stats", CLI_FLAG, &stats, "print only a summary: examples, tokens, trained tokens, truncated"},
        {"chat-template", CLI_STR, &tmpl, "llama3 or llama2 (default: from the tokenizer)"},
        {"max-seq-len", CLI_INT, &max_len, "longest example in tokens (0: no limit)"},
        {"truncate", CLI_FLAG, &truncate, "cut longer examples instead of rejecting the file"},
        {"pack", CLI_INT, &pack, "print packed rows of N tokens (file order): ids, labels, position_ids, segment"},
        {"encode", CLI_STR, &encode, "raw mode: FILE of JSON strings, one a line; prints ids and offsets"},
        {"add-special", CLI_FLAG, &add_special, "raw mode: add the post-processor's tokens (BOS)"},
        {"decode", CLI_FLAG, &decode, "raw mode: also print the ids decoded back to text"},
        {"time", CLI_FLAG, &timing, "raw mode: print only the encoding throughput (stderr)"},
        {"new-tokenizer", CLI_STR, &new_tok, "write the built-in byte-level BPE tokenizer.json to FILE"},
        {"vocab-size", CLI_INT, &vocab_size, "with --new-tokenizer: its vocabulary size (≥ 266)"},
    };
    const int nopts = (int)(sizeof opts / sizeof opts[0]);
    const char *synopsis = "--model DIR (--data FILE [--stats] | --encode FILE)";
    if (cli_wants_help(argc, argv)) {
        cli_usage("tokenize", synopsis, opts, nopts);
        return 0;
    }
    ln_err e;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) {
        fprintf(stderr, "loranull tokenize: %s\n", e.msg);
        return 2;
    }
    if (new_tok) {
        if (ln_tokenizer_make_default(new_tok, vocab_size, &e)) {
            fprintf(stderr, "loranull tokenize: %s\n", e.msg);
            return 1;
        }
        return 0;
    }
    if (!model || (!data == !encode)) {
        fprintf(stderr, "loranull tokenize: needs --model DIR and one of --data FILE or --encode FILE\n");
        return 2;
    }
    if (max_len < 0) {
        fprintf(stderr, "loranull tokenize: --max-seq-len must be ≥ 0\n");
        return 2;
    }
    ln_tokenizer *tok;
    if (ln_tokenizer_load(model, &tok, &e)) {
        fprintf(stderr, "loranull tokenize: %s\n", e.msg);
        return 1;
    }
    int rc = 0;
    if (encode) {
        if (encode_lines(tok, encode, add_special, decode, timing, &e)) {
            fprintf(stderr, "loranull tokenize: %s\n", e.msg);
            rc = 1;
        }
        ln_tokenizer_free(tok);
        return rc;
    }
    ln_data_opts o = {.max_seq_len = max_len, .overlong = truncate ? LN_OVERLONG_TRUNCATE : LN_OVERLONG_REJECT,
                      .chat_template = tmpl};
    ln_dataset *d;
    if (ln_dataset_load(data, tok, &o, &d, &e)) {
        fprintf(stderr, "loranull tokenize: %s\n", e.msg);
        ln_tokenizer_free(tok);
        return 1;
    }
    if (pack > 0) {
        /* one pass over the file in its order, as packed rows (see ln_packed_row in data.h) */
        ln_loader l;
        ln_loader_init(&l, d, 0, 0);
        ln_packed_row r;
        ln_packed_row_init(&r, pack);
        while (l.pos.epoch == 0 && !(l.pos.index >= d->n)) {
            ln_loader_next_packed(&l, &r);
            fputc('{', stdout);
            print_ids(stdout, "input_ids", r.input_ids, r.len);
            fputc(',', stdout);
            print_ids(stdout, "labels", r.labels, r.len);
            fputc(',', stdout);
            print_ids(stdout, "position_ids", r.position_ids, r.len);
            fputc(',', stdout);
            print_ids(stdout, "segment", r.segment, r.len);
            printf(",\"examples\":%d}\n", r.n_examples);
        }
        ln_packed_row_free(&r);
        ln_loader_free(&l);
    } else if (stats) {
        printf("{\"examples\":%lld,\"tokens\":%lld,\"trained_tokens\":%lld,\"truncated\":%lld}\n",
               (long long)d->stats.examples, (long long)d->stats.tokens, (long long)d->stats.trained_tokens,
               (long long)d->stats.truncated);
    } else {
        for (int64_t i = 0; i < d->n; i++) {
            fputc('{', stdout);
            print_ids(stdout, "input_ids", d->ex[i].input_ids, d->ex[i].len);
            fputc(',', stdout);
            print_ids(stdout, "labels", d->ex[i].labels, d->ex[i].len);
            fputs("}\n", stdout);
        }
    }
    ln_dataset_free(d);
    ln_tokenizer_free(tok);
    return 0;
}
