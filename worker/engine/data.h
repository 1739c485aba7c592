/* data.h — training data: JSONL examples turned into token ids and loss labels.
 *
 * Formats, one example a line (DESIGN.md §3):
 *   {"messages":[{"role":"system|user|assistant","content":"...","weight":0|1}]}
 *   {"prompt":"...","completion":"..."}   {"text":"..."}
 *   {"input_ids":[...],"labels":[...]?}     (pre-tokenized; labels default to input_ids)
 * labels[i] is the target id for position i's *own* token, -100 where the loss is masked —
 * exactly transformers' convention (the model shifts: position t predicts labels[t+1]).
 *
 * How text lines become ids and labels (chat templates, masks): worker/engine/chat.h.
 *
 * The whole file is validated before training starts; a bad line is an error naming the file,
 * the line number and the field ("data.jsonl line 7: field \"messages[2].role\": unknown role
 * \"bot\" …"); with several bad lines it starts "N bad lines in all; " and lists the first three. Blank lines are allowed and skipped; a UTF-8
 * BOM is accepted. An example with no trained token (after truncation, too) is an error: it would
 * add nothing but a division by zero. Ownership: a dataset owns its examples. */
#ifndef LN_DATA_H
#define LN_DATA_H

#include <stdint.h>

#include "common/err.h"

#define LN_IGNORE_INDEX (-100)

typedef struct ln_tokenizer ln_tokenizer; /* worker/engine/tokenizer.h */

typedef struct ln_example {
    int32_t *input_ids;
    int32_t *labels;
    int len;
    int line;          /* 1-based line in the source file */
} ln_example;

typedef enum { LN_OVERLONG_REJECT, LN_OVERLONG_TRUNCATE } ln_overlong_policy;

typedef struct ln_data_opts {
    int max_seq_len;                 /* 0 = no limit */
    ln_overlong_policy overlong;     /* what to do with an example longer than max_seq_len */
    const char *chat_template;       /* "llama3", "llama2" or NULL = from the tokenizer/model */
} ln_data_opts;

/* trained_tokens counts labels[1..len) that are not -100 — the targets the shifted loss
 * averages over (labels[0] is never a target). truncated: examples cut to max_seq_len. */
typedef struct ln_data_stats {
    int64_t examples, tokens, trained_tokens, truncated;
} ln_data_stats;

typedef struct ln_dataset {
    ln_example *ex;
    int64_t n;
    ln_data_stats stats;
    char *path;
} ln_dataset;

/* Loads and validates every line. tok may be NULL when every line is pre-tokenized. */
int ln_dataset_load(const char *path, const ln_tokenizer *tok, const ln_data_opts *opts,
                    ln_dataset **out, ln_err *e);
void ln_dataset_free(ln_dataset *d);

/* Seeded order over the examples, reshuffled each epoch; its position is what checkpoints save. */
typedef struct ln_data_pos {
    int64_t epoch;   /* 0-based */
    int64_t index;   /* next example within the epoch's order */
} ln_data_pos;

typedef struct ln_loader {
    const ln_dataset *ds;
    uint64_t seed;
    int shuffle;
    int64_t *order;   /* permutation for the current epoch */
    ln_data_pos pos;
} ln_loader;

void ln_loader_init(ln_loader *l, const ln_dataset *ds, uint64_t seed, int shuffle);
/* Moves to pos (rebuilding that epoch's permutation). */
void ln_loader_seek(ln_loader *l, ln_data_pos pos);
/* Next example; crosses into the next epoch (reshuffling) when the current one ends. */
const ln_example *ln_loader_next(ln_loader *l);
void ln_loader_free(ln_loader *l);

/* ---- Packing (optional): several examples, in loader order, laid end to end in one row ----
 *
 * A packed row of `cap` tokens holds whole examples back to back (an example longer than cap is
 * cut to cap, alone in its row). The model must keep them apart, and the row says how:
 *   segment[t]      — which example of the row token t belongs to (0, 1, 2, …); -1 on padding
 *                     (t ≥ len). Attention is causal AND within one segment only: token t may attend
 *                     to token u iff u ≤ t and segment[u] == segment[t] (block-diagonal causal mask).
 *   position_ids[t] — t minus the start of its segment: RoPE positions restart at 0 per example.
 *   labels[t]       — the example's own labels, except that the first token of every segment is
 *                     -100. With transformers' shift (position t predicts labels[t+1]), the last token
 *                     of one example therefore never learns to predict the first of the next — as
 *                     transformers' DataCollatorWithFlattening does. Padding labels are -100.
 * Computed this way, the loss over a packed row equals the sum of the examples' separate losses.
 * Ownership: the row owns its four arrays (ln_packed_row_free). */
typedef struct ln_packed_row {
    int32_t *input_ids, *labels, *position_ids, *segment;
    int cap;          /* tokens the arrays hold */
    int len;          /* tokens used; the rest is padding (input_ids 0, labels -100, segment -1) */
    int n_examples;   /* segments in this row */
} ln_packed_row;

void ln_packed_row_init(ln_packed_row *r, int cap);
void ln_packed_row_free(ln_packed_row *r);
/* Fills r with the next examples of the loader's order that fit (at least one; greedy, in order,
 * never past the end of the epoch); the loader's position moves past them, so checkpoints save
 * and resume exactly as without packing. Returns the number of examples packed (0 only for an
 * empty dataset). */
int ln_loader_next_packed(ln_loader *l, ln_packed_row *r);

#endif
