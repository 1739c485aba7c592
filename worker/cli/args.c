/* args.c — the CLI option parser (see args.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/cli/args.h"

static int parse_value(const cli_opt *o, const char *v, ln_err *e)
{
    char *end = NULL;
    errno = 0;
    switch (o->kind) {
    case CLI_STR: *(const char **)o->target = v; return 0;
    case CLI_INT: {
        long x = strtol(v, &end, 10);
        if (errno || *end || end == v || x < -2147483647L || x > 2147483647L) break;
        *(int *)o->target = (int)x;
        return 0;
    }
    case CLI_I64: {
        long long x = strtoll(v, &end, 10);
        if (errno || *end || end == v) break;
        *(int64_t *)o->target = x;
        return 0;
    }
    case CLI_U64: {
        if (v[0] == '-') break;
        unsigned long long x = strtoull(v, &end, 10);
        if (errno || *end || end == v) break;
        *(uint64_t *)o->target = x;
        return 0;
    }
    case CLI_FLOAT: {
        float x = strtof(v, &end);
        if (errno || *end || end == v) break;
        *(float *)o->target = x;
        return 0;
    }
    case CLI_DOUBLE: {
        double x = strtod(v, &end);
        if (errno || *end || end == v) break;
        *(double *)o->target = x;
        return 0;
    }
    case CLI_FLAG: break;
    }
    return ln_errf(e, "option --%s: \"%s\" is not a valid %s", o->name, v,
                   o->kind == CLI_FLOAT || o->kind == CLI_DOUBLE ? "number" : o->kind == CLI_U64 ? "non-negative integer" : "integer");
}

int cli_parse(int argc, char **argv, int first, const cli_opt *opts, int nopts, ln_err *e)
{
    for (int i = first; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) return ln_errf(e, "unexpected argument \"%s\" (options start with --)", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const cli_opt *o = NULL;
        for (int k = 0; k < nopts; k++)
            if (strlen(opts[k].name) == nlen && strncmp(opts[k].name, name, nlen) == 0) o = &opts[k];
        if (!o) return ln_errf(e, "unknown option --%.*s (see --help)", (int)nlen, name);
        if (o->kind == CLI_FLAG) {
            if (eq) return ln_errf(e, "option --%s takes no value", o->name);
            *(int *)o->target = 1;
            continue;
        }
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!v) return ln_errf(e, "option --%s needs a value", o->name);
        if (parse_value(o, v, e)) return -1;
    }
    return 0;
}

void cli_usage(const char *cmd, const char *synopsis, const cli_opt *opts, int nopts)
{
    printf("usage: loranull %s %s\n\noptions:\n", cmd, synopsis);
    for (int k = 0; k < nopts; k++)
        if (opts[k].help) printf("  --%-16s %s\n", opts[k].name, opts[k].help);
}

int cli_wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) return 1;
    return 0;
}
