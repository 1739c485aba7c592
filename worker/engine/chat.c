/* chat.c — chat templates and loss masks (see chat.h). Text formats arrive with the tokenizer. */
#include "worker/engine/chat.h"

int ln_chat_encode_json(const ln_tokenizer *tok, const char *template_name, ln_chat_format fmt,
                        json_t *obj, int32_t **ids, int32_t **labels, int *len, ln_err *e) {
    return ln_errf(e, "text formats are not supported by this build yet (use \"input_ids\")");
}
