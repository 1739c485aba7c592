/* wd_models.h — the base models a worker offers: every HF model folder directly under --models.
 *
 * A folder counts when it holds config.json and either model.safetensors or a sharded
 * model.safetensors.index.json; its name is the model's name in job specs ("model": "tiny-llama").
 * Folders that look like models but are not complete are reported (the user meant them). */
#ifndef WD_MODELS_H
#define WD_MODELS_H

#include <jansson.h>

#include "common/err.h"

/* A new JSON array of model names, sorted. Fails when dir cannot be read. Folders skipped for a
 * reason are logged as warnings. */
json_t *wd_models_scan(const char *dir, ln_err *e);

#endif
