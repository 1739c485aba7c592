/* main.c — `loranull`: the engine on the command line, one command, one job, no server. */
#include <stdio.h>
#include <string.h>

#include "worker/cli/commands.h"

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help; /* NULL: hidden (test helpers) */
} COMMANDS[] = {
    {"model", cmd_model, "model new --config CFG.json --out DIR: a randomly initialised model in HF layout"},
    {"train", cmd_train, "train an adapter (or all weights) on a JSONL dataset"},
    {"forward", cmd_forward, "logits of a model (+ adapter) for token ids, as safetensors"},
    {"tokenize", cmd_tokenize, "tokenize --model DIR --data FILE [--stats]: the ids and labels training would see"},
    {"covariance", cmd_covariance, "calibration covariances of a model's layer inputs, as safetensors"},
    {"init", cmd_init, "a method's initial adapter factors (lora_null_v2, pissa, corda, ...)"},
    {"export", cmd_export, "a run's adapter in PEFT format for the original base, or --merge a full model"},
    {"debug-grads", cmd_debug_grads, NULL},
    {"bench-sgemm", cmd_bench_sgemm, NULL},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: loranull <command> [options]   (loranull <command> --help for its options)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++)
        if (COMMANDS[i].help) fprintf(f, "  %-12s %s\n", COMMANDS[i].name, COMMANDS[i].help);
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++)
        if (strcmp(argv[1], COMMANDS[i].name) == 0) return COMMANDS[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "loranull: unknown command \"%s\" (run loranull --help)\n", argv[1]);
    return 2;
}
