/* tokenizer.c — tokenizer.json BPE (see tokenizer.h). */
#include "worker/engine/tokenizer.h"

int ln_tokenizer_vocab_size(const ln_tokenizer *t) { return 0; }
