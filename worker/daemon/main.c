/* main.c — loranull-worker: runs fine-tuning jobs leased from a loranull-server (see wd_daemon.h).
 *
 *   loranull-worker --server URL --token-file F --models DIR --device cpu|cuda:N [--ranks N]
 *                   [--work-dir DIR] [--name NAME] [--grace-s S] [--lease-wait-s S] [--once]
 *                   [--advertise-host H] [--comm-ports LO-HI] [--rendezvous-timeout-s S] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "worker/daemon/wd_daemon.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: loranull-worker --server URL --token-file FILE --models DIR --device cpu|cuda:N [options]\n"
            "\n"
            "Registers with a loranull-server, leases fine-tuning jobs for the models under --models (one HF\n"
            "model folder each: config.json + model.safetensors [+ tokenizer.json]), runs them and reports back.\n"
            "\n"
            "  --server URL          the server's base URL, e.g. http://127.0.0.1:8080\n"
            "  --token-file FILE     file holding the worker token (loranull-server tokens create --name W)\n"
            "  --models DIR          folder of model folders; a folder's name is the model's name in jobs\n"
            "  --device DEV          cpu, or cuda:N\n"
            "  --ranks N             devices (ranks) offered, default 1; a GPU worker drives one GPU (1): run\n"
            "                        one worker per GPU (--device cuda:0, cuda:1, ...) and a multi-rank job is\n"
            "                        spread over them, NCCL between them\n"
            "  --work-dir DIR        downloads, checkpoints, exports, calibration cache; default ./var/worker\n"
            "  --name NAME           name shown by the server, default the host name\n"
            "  --grace-s S           SIGTERM: seconds to checkpoint, report and release, default 25\n"
            "  --lease-wait-s S      long-poll length for a lease, default 20\n"
            "  --heartbeat-s S       heartbeat at least every S seconds, default 2\n"
            "  --once                exit after one job\n"
            "  --advertise-host H    where the other CPU workers of a job split over workers reach this one (it\n"
            "                        listens there when it holds rank 0); default $LORANULL_ADVERTISE_HOST or\n"
            "                        127.0.0.1 — in Kubernetes the pod IP\n"
            "  --comm-ports LO-HI    the ports that listener may use, default $LORANULL_COMM_PORTS or any free\n"
            "                        port (0); a NetworkPolicy between worker pods must admit them\n"
            "  --rendezvous-timeout-s S  the ranks of a split job must meet within S seconds, default 120 (GPU\n"
            "                        workers: the NCCL join too; NCCL picks its own address: NCCL_SOCKET_IFNAME)\n"
            "  --log-level L         debug|info|warn|error, default info\n"
            "\n"
            "Exit status: 0 after SIGTERM/SIGINT or --once; 1 on a bad option, a refused token or a shutdown\n"
            "grace that ran out; 3 after a job failed with device_error, once reported (a CUDA context may\n"
            "stay unusable after an error: the supervisor restarts the worker, a fresh process).\n");
}

static int read_token(const char *path, char **out, ln_err *e) {
    size_t n;
    if (ln_read_file(path, out, &n, e) != 0) return ln_err_prefix(e, "--token-file");
    char *t = *out;
    while (n > 0 && (t[n - 1] == '\n' || t[n - 1] == '\r' || t[n - 1] == ' ')) t[--n] = 0;
    if (n == 0) {
        free(t);
        return ln_errf(e, "--token-file %s: the file is empty", path);
    }
    for (size_t i = 0; i < n; i++)
        if (t[i] <= ' ' || t[i] > '~') {
            free(t);
            return ln_errf(e, "--token-file %s: the token holds a character that is not printable ASCII", path);
        }
    return 0;
}

/* "LO-HI", "P" (one port) or "0" (any free port). */
static int parse_ports(const char *flag, const char *v, int *lo, int *hi, ln_err *e) {
    char *end;
    long a = strtol(v, &end, 10), b = a;
    if (end != v && *end == '-') b = strtol(end + 1, &end, 10);
    if (!*v || *end || a < 0 || b < a || b > 65535 || (a == 0 && b != 0))
        return ln_errf(e, "%s '%s': expected LO-HI within 1-65535 (or 0 for any free port)", flag, v);
    *lo = (int)a;
    *hi = (int)b;
    return 0;
}

static int parse_double(const char *flag, const char *v, double lo, double *out, ln_err *e) {
    char *end;
    double x = strtod(v, &end);
    if (*end || end == v || x < lo) return ln_errf(e, "%s '%s': expected a number >= %g", flag, v, lo);
    *out = x;
    return 0;
}

int main(int argc, char **argv) {
    wd_config c = {.device = NULL, .work_dir = "var/worker", .ranks = 1, .grace_s = 25, .lease_wait_s = 20,
                   .heartbeat_max_s = 2, .flush_interval_s = 0.5, .advertise_host = "127.0.0.1",
                   .rendezvous_timeout_s = 120};
    const char *token_file = NULL, *level = "info";
    ln_err e = {{0}};
    ln_log_set_plain(isatty(2));
    const char *env_host = getenv("LORANULL_ADVERTISE_HOST"), *env_ports = getenv("LORANULL_COMM_PORTS");
    if (env_host && *env_host) c.advertise_host = env_host;
    if (env_ports && *env_ports && parse_ports("LORANULL_COMM_PORTS", env_ports, &c.comm_port_lo, &c.comm_port_hi, &e)) {
        fprintf(stderr, "loranull-worker: %s\n", e.msg);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--once") == 0) {
            c.once = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "loranull-worker: %s needs a value (or is unknown; see --help)\n", a);
            return 2;
        }
        const char *v = argv[++i];
        int rc = 0;
        double x;
        if (strcmp(a, "--server") == 0) c.server = v;
        else if (strcmp(a, "--token-file") == 0) token_file = v;
        else if (strcmp(a, "--models") == 0) c.models_dir = v;
        else if (strcmp(a, "--device") == 0) c.device = v;
        else if (strcmp(a, "--work-dir") == 0) c.work_dir = v;
        else if (strcmp(a, "--name") == 0) c.name = v;
        else if (strcmp(a, "--log-level") == 0) level = v;
        else if (strcmp(a, "--advertise-host") == 0) c.advertise_host = v;
        else if (strcmp(a, "--comm-ports") == 0) rc = parse_ports(a, v, &c.comm_port_lo, &c.comm_port_hi, &e);
        else if (strcmp(a, "--rendezvous-timeout-s") == 0) rc = parse_double(a, v, 1, &c.rendezvous_timeout_s, &e);
        else if (strcmp(a, "--ranks") == 0) {
            rc = parse_double(a, v, 1, &x, &e);
            if (rc == 0 && (x != (int)x || x > 1024)) rc = ln_errf(&e, "--ranks '%s': expected an integer 1..1024", v);
            c.ranks = (int)x;
        } else if (strcmp(a, "--grace-s") == 0) rc = parse_double(a, v, 0, &c.grace_s, &e);
        else if (strcmp(a, "--lease-wait-s") == 0) rc = parse_double(a, v, 0, &c.lease_wait_s, &e);
        else if (strcmp(a, "--heartbeat-s") == 0) rc = parse_double(a, v, 0.05, &c.heartbeat_max_s, &e);
        else {
            fprintf(stderr, "loranull-worker: unknown option %s (see --help)\n", a);
            return 2;
        }
        if (rc) {
            fprintf(stderr, "loranull-worker: %s\n", e.msg);
            return 2;
        }
    }
    if (!c.server || !token_file || !c.models_dir || !c.device) {
        fprintf(stderr, "loranull-worker: --server, --token-file, --models and --device are required (see --help)\n");
        return 2;
    }
    static const char *const levels[] = {"debug", "info", "warn", "error"};
    int lvl = -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(level, levels[i]) == 0) lvl = i;
    if (lvl < 0) {
        fprintf(stderr, "loranull-worker: --log-level '%s': expected debug, info, warn or error\n", level);
        return 2;
    }
    ln_log_set_level((ln_log_level)lvl);
    char *token = NULL;
    if (read_token(token_file, &token, &e) != 0) {
        fprintf(stderr, "loranull-worker: %s\n", e.msg);
        return 2;
    }
    c.token = token;
    int code = wd_daemon_run(&c, &e);
    free(token);
    if (code < 0) {
        fprintf(stderr, "loranull-worker: %s\n", e.msg);
        return 2;
    }
    return code;
}
