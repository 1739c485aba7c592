/* args.h — a tiny "--name value" / "--flag" option parser shared by the CLI subcommands.
 *
 * Usage: declare an array of cli_opt {name, kind, &target, help}, call cli_parse; unknown
 * options, missing values and malformed numbers are one-sentence errors naming the option. */
#ifndef LN_CLI_ARGS_H
#define LN_CLI_ARGS_H

#include <stdint.h>

#include "common/err.h"

typedef enum { CLI_STR, CLI_INT, CLI_I64, CLI_U64, CLI_FLOAT, CLI_DOUBLE, CLI_FLAG } cli_kind;

typedef struct cli_opt {
    const char *name;   /* without the leading "--" */
    cli_kind kind;
    void *target;       /* const char **, int *, int64_t *, uint64_t *, float *, double *, int * */
    const char *help;   /* NULL hides the option from the usage text */
} cli_opt;

/* Parses argv[first..argc). Positional arguments are refused. */
int cli_parse(int argc, char **argv, int first, const cli_opt *opts, int nopts, ln_err *e);
/* Prints "usage: loranull <cmd> ..." and the options. */
void cli_usage(const char *cmd, const char *synopsis, const cli_opt *opts, int nopts);
/* Did argv ask for help (-h/--help)? */
int cli_wants_help(int argc, char **argv);

#endif
