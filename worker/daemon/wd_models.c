/* wd_models.c — see wd_models.h. */
#include "worker/daemon/wd_models.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"

static int has(const char *dir, const char *name) {
    char *p = ln_path_join(dir, name);
    int ok = ln_file_exists(p);
    free(p);
    return ok;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

json_t *wd_models_scan(const char *dir, ln_err *e) {
    DIR *d = opendir(dir);
    if (!d) {
        ln_errf(e, "--models %s: cannot read the directory: %s", dir, strerror(errno));
        return NULL;
    }
    char *names[64];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 64) {
        if (de->d_name[0] == '.') continue;
        char *sub = ln_path_join(dir, de->d_name);
        int cfg = has(sub, "config.json");
        int weights = has(sub, "model.safetensors") || has(sub, "model.safetensors.index.json");
        if (cfg && weights && strlen(de->d_name) <= 256) names[n++] = ln_xstrdup(de->d_name);
        else if (cfg || weights)
            ln_log(LN_LOG_WARN, "worker", "%s is not offered: it needs config.json and model.safetensors (or a "
                   "sharded index)", sub);
        free(sub);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    json_t *out = json_array();
    for (int i = 0; i < n; i++) {
        json_array_append_new(out, json_string(names[i]));
        free(names[i]);
    }
    return out;
}
