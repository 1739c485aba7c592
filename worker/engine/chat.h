/* chat.h — turning one JSONL example into token ids and loss labels.
 *
 * Chat templates built in (the strings Meta publishes, as rendered by transformers'
 * apply_chat_template), with the trained spans being what a `{% generation %}` block marks:
 *   llama3: <|begin_of_text|> then per message
 *           <|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>
 *           trained: an assistant turn's "{content|trim}<|eot_id|>".
 *   llama2: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user|strip} [/INST] {assistant|strip} </s>
 *           (the system block only inside the first user turn; each later user turn starts with <s>)
 *           trained: an assistant turn's "{content|strip} </s>".
 * Roles must be system (first message only), user, assistant; llama2 also needs user/assistant to
 * alternate starting with user. An assistant turn with "weight": 0 is rendered but not trained.
 * The rendered text is tokenized as one string (special tokens in it are matched, as HF does), and a
 * token trains when it lies in a trained span by transformers' rule: from the token holding the
 * span's first character to the token holding its last.
 *
 *   {"prompt","completion"}: BOS + prompt + completion + EOS, loss on completion + EOS.
 *   {"text"}: the tokenizer's own encoding (BOS as the post-processor says), loss on every token. */
#ifndef LN_CHAT_H
#define LN_CHAT_H

#include <jansson.h>
#include <stdint.h>

#include "common/err.h"
#include "worker/engine/tokenizer.h"

typedef enum {
    LN_CHAT_MESSAGES,
    LN_CHAT_PROMPT_COMPLETION,
    LN_CHAT_TEXT,
    LN_CHAT_PRETOKENIZED,
} ln_chat_format;

typedef enum { LN_TEMPLATE_LLAMA3, LN_TEMPLATE_LLAMA2 } ln_chat_template;

/* name "llama3" | "llama2", or NULL: chosen from the tokenizer (tokenizer_config.json's
 * chat_template if it names llama2's [INST] or llama3's headers; else byte-level → llama3,
 * SentencePiece → llama2). */
int ln_chat_template_pick(const ln_tokenizer *tok, const char *name, ln_chat_template *out, ln_err *e);

/* A rendered example: text plus the byte spans the loss trains on. Owned by the caller
 * (ln_chat_rendered_free). */
typedef struct ln_chat_rendered {
    char *text;
    size_t len, cap;
    size_t (*spans)[2];  /* [start, end) byte ranges in text */
    int n_spans, cap_spans;
    int add_special;     /* encode with the post-processor's ids (text format) */
    int all_trained;     /* every token trains (text format) */
    size_t oom;          /* while rendering: the bytes an allocation could not get (0 = none) */
} ln_chat_rendered;
void ln_chat_rendered_free(ln_chat_rendered *r);

/* Renders a JSON example of format fmt (not PRETOKENIZED). Errors name the field, e.g.
 * messages[2].role. */
int ln_chat_render(const ln_tokenizer *tok, ln_chat_template tpl, ln_chat_format fmt, json_t *obj,
                   ln_chat_rendered *out, ln_err *e);

/* Renders and tokenizes: new ids and labels (caller frees both), labels -100 where masked. */
int ln_chat_encode_json(const ln_tokenizer *tok, const char *template_name, ln_chat_format fmt,
                        json_t *obj, int32_t **ids, int32_t **labels, int *len, ln_err *e);

#endif
