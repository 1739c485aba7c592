/* commands.h — the subcommands of `loranull`. Each takes argc/argv after its own name
 * (argv[0] is the command name), prints one clear sentence on error and returns the exit code.
 * To add one: declare it here and add a row to COMMANDS in main.c. */
#ifndef LN_CLI_COMMANDS_H
#define LN_CLI_COMMANDS_H

int cmd_model(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_debug_grads(int argc, char **argv);
int cmd_bench_sgemm(int argc, char **argv);
int cmd_covariance(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);

#endif
