/* main.c — loranull-server: the control server, and its key/token subcommands.
 *
 *   loranull-server [serve] --listen HOST:PORT --data-dir DIR [--config FILE] [options]
 *   loranull-server keys create --project NAME --data-dir DIR     (prints the key once)
 *   loranull-server keys revoke KEY_ID|KEY --data-dir DIR
 *   loranull-server keys list --data-dir DIR
 *   loranull-server tokens create --name NAME --data-dir DIR      (worker token, printed once)
 *   loranull-server tokens revoke TOKEN_ID|TOKEN --data-dir DIR
 *   loranull-server tokens list --data-dir DIR
 *   loranull-server keys import --data-dir DIR < "PROJECT KEY" lines   (given secrets, e.g. from a
 *   loranull-server tokens import --name NAME --data-dir DIR < token     Kubernetes Secret; idempotent)
 *
 * Precedence: built-in defaults < --config FILE (JSON, keys as the long flags with '_') < flags.
 * SIGTERM/SIGINT stop it gracefully: stop accepting, end streams and long-polls, stop, close the DB. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "common/log.h"
#include "common/util.h"
#include "server/api.h"
#include "server/auth.h"
#include "server/http.h"
#include "server/jobq.h"
#include "server/sched.h"
#include "server/server.h"
#include "server/sse.h"
#include "server/store.h"



static void usage(FILE *f) {
    fprintf(f,
            "usage: loranull-server [serve] --listen HOST:PORT --data-dir DIR [--config FILE] [options]\n"
            "       loranull-server keys create --project NAME --data-dir DIR\n"
            "       loranull-server keys revoke KEY_ID|KEY --data-dir DIR\n"
            "       loranull-server keys list --data-dir DIR\n"
            "       loranull-server tokens create --name NAME --data-dir DIR\n"
            "       loranull-server tokens revoke TOKEN_ID|TOKEN --data-dir DIR\n"
            "       loranull-server tokens list --data-dir DIR\n"
            "       loranull-server keys import --data-dir DIR       < lines 'PROJECT KEY' (given secrets)\n"
            "       loranull-server tokens import --name NAME --data-dir DIR   < one token\n"
            "options (config file keys in brackets):\n"
            "  --listen HOST:PORT          [listen]            default 127.0.0.1:8080 (port 0 = any free port)\n"
            "  --internal-listen HOST:PORT [internal_listen]   serve the workers' /internal/v1 only here (404 on\n"
            "                                                  --listen, which keeps /v1, the dashboard, /metrics);\n"
            "                                                  /healthz, /readyz on both. Default: unset, one listener\n"
            "  --data-dir DIR              [data_dir]          database and file blobs (required)\n"
            "  --migrations-dir DIR        [migrations_dir]    default <exe>/../migrations (source tree)\n"
            "                                                  or /usr/share/loranull/migrations\n"
            "  --static-dir DIR            [static_dir]        dashboard, default <exe>/../server/static\n"
            "                                                  or /usr/share/loranull/static\n"
            "  --chartjs-dir DIR           [chartjs_dir]       default /usr/share/javascript/chart.js\n"
            "  --threads N                 [threads]           HTTP threads, default 4\n"
            "  --lease-ttl-s S             [lease_ttl_s]       default 30\n"
            "  --max-attempts N            [max_attempts]      default 3\n"
            "  --retry-backoff-s S         [retry_backoff_s]   default 1 (doubles per attempt)\n"
            "  --retry-backoff-max-s S     [retry_backoff_max_s] default 60\n"
            "  --lease-wait-max-s S        [lease_wait_max_s]  default 30\n"
            "  --worker-timeout-s S        [worker_timeout_s]  default 60\n"
            "  --sse-keepalive-s S         [sse_keepalive_s]   default 15\n"
            "  --pause-grace-s S           [pause_grace_s]     default 60: a paused job's worker may still\n"
            "                                                  upload a checkpoint this long\n"
            "  --max-body-bytes N          [max_body_bytes]    default 1048576\n"
            "  --max-upload-bytes N        [max_upload_bytes]  default 1073741824\n"
            "  --log-level debug|info|warn|error [log_level]   default info\n"
            "  --no-access-log             [access_log: false] no line per request (errors still logged)\n");
}

static void exe_relative(const char *rel, char *out, size_t cap) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        snprintf(out, cap, "%s", rel);
        return;
    }
    exe[n] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    snprintf(out, cap, "%.3000s/../%.200s", exe, rel);
}

static void defaults(void) {
    snprintf(g_cfg.listen_host, sizeof g_cfg.listen_host, "127.0.0.1");
    g_cfg.port = 8080;
    /* bin/ of the source tree, build/asan/bin/ of the source tree, then an installed layout. */
    exe_relative("migrations", g_cfg.migrations_dir, sizeof g_cfg.migrations_dir);
    if (!ln_file_exists(g_cfg.migrations_dir)) exe_relative("../../migrations", g_cfg.migrations_dir, sizeof g_cfg.migrations_dir);
    if (!ln_file_exists(g_cfg.migrations_dir))
        snprintf(g_cfg.migrations_dir, sizeof g_cfg.migrations_dir, "/usr/share/loranull/migrations");
    exe_relative("server/static", g_cfg.static_dir, sizeof g_cfg.static_dir);
    if (!ln_file_exists(g_cfg.static_dir)) exe_relative("../../server/static", g_cfg.static_dir, sizeof g_cfg.static_dir);
    if (!ln_file_exists(g_cfg.static_dir))
        snprintf(g_cfg.static_dir, sizeof g_cfg.static_dir, "/usr/share/loranull/static");
    snprintf(g_cfg.chartjs_dir, sizeof g_cfg.chartjs_dir, "/usr/share/javascript/chart.js");
    g_cfg.max_body_bytes = 1 << 20;
    g_cfg.max_upload_bytes = 1ull << 30;
    g_cfg.lease_ttl_s = 30;
    g_cfg.max_attempts = 3;
    g_cfg.retry_backoff_s = 1;
    g_cfg.retry_backoff_max_s = 60;
    g_cfg.lease_wait_max_s = 30;
    g_cfg.worker_timeout_s = 60;
    g_cfg.sse_keepalive_s = 15;
    g_cfg.pause_grace_s = 60;
    g_cfg.threads = 4;
    g_cfg.log_requests = 1;
}

/* HOST:PORT of --listen or --internal-listen (flag names it in errors) into host[256] and port. */
static int parse_listen(const char *flag, const char *v, char host[256], int *port_out, ln_err *e) {
    const char *colon = strrchr(v, ':');
    if (!colon) return ln_errf(e, "%s '%s': expected HOST:PORT", flag, v);
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535) return ln_errf(e, "%s '%s': bad port", flag, v);
    size_t hl = (size_t)(colon - v);
    if (hl >= 256) return ln_errf(e, "%s '%s': host too long", flag, v);
    /* [::1]:8080 → ::1 */
    if (hl >= 2 && v[0] == '[' && v[hl - 1] == ']') {
        memcpy(host, v + 1, hl - 2);
        host[hl - 2] = 0;
    } else {
        memcpy(host, v, hl);
        host[hl] = 0;
    }
    *port_out = (int)port;
    return 0;
}

static int parse_num(const char *flag, const char *v, double lo, double hi, double *out, ln_err *e) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || x < lo || x > hi) return ln_errf(e, "%s '%s': expected a number in [%g, %g]", flag, v, lo, hi);
    *out = x;
    return 0;
}

static int parse_level(const char *v, ln_err *e) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (strcmp(v, names[i]) == 0) {
            ln_log_set_level((ln_log_level)i);
            return 0;
        }
    return ln_errf(e, "log level '%s': expected debug, info, warn or error", v);
}

/* One setting by its config-file key; v is the value as text. */
static int set_option(const char *key, const char *v, ln_err *e) {
    double x;
    char flag[80];
    snprintf(flag, sizeof flag, "%s", key);
#define NUM(name, lo, hi, field, type)                                          \
    if (strcmp(key, name) == 0) {                                               \
        if (parse_num(flag, v, lo, hi, &x, e) != 0) return -1;                  \
        g_cfg.field = (type)x;                                                  \
        return 0;                                                               \
    }
#define STR(name, field)                                                        \
    if (strcmp(key, name) == 0) {                                               \
        snprintf(g_cfg.field, sizeof g_cfg.field, "%s", v);                     \
        return 0;                                                               \
    }
    if (strcmp(key, "listen") == 0) return parse_listen("--listen", v, g_cfg.listen_host, &g_cfg.port, e);
    if (strcmp(key, "internal_listen") == 0) {
        if (parse_listen("--internal-listen", v, g_cfg.internal_host, &g_cfg.internal_port, e) != 0) return -1;
        /* An empty host would read as unset: the wildcard address spelled out. */
        if (!g_cfg.internal_host[0]) snprintf(g_cfg.internal_host, sizeof g_cfg.internal_host, "0.0.0.0");
        return 0;
    }
    if (strcmp(key, "log_level") == 0) return parse_level(v, e);
    if (strcmp(key, "access_log") == 0) {
        g_cfg.log_requests = strcmp(v, "true") == 0 || strcmp(v, "1") == 0;
        return 0;
    }
    STR("data_dir", data_dir)
    STR("migrations_dir", migrations_dir)
    STR("static_dir", static_dir)
    STR("chartjs_dir", chartjs_dir)
    NUM("threads", 1, 256, threads, int)
    NUM("lease_ttl_s", 0.1, 86400, lease_ttl_s, double)
    NUM("max_attempts", 1, 1000, max_attempts, int)
    NUM("retry_backoff_s", 0, 86400, retry_backoff_s, double)
    NUM("retry_backoff_max_s", 0, 86400, retry_backoff_max_s, double)
    NUM("lease_wait_max_s", 0, 3600, lease_wait_max_s, double)
    NUM("worker_timeout_s", 1, 86400, worker_timeout_s, double)
    NUM("sse_keepalive_s", 0.1, 3600, sse_keepalive_s, double)
    NUM("pause_grace_s", 0, 86400, pause_grace_s, double)
    NUM("max_body_bytes", 1024, 1 << 30, max_body_bytes, size_t)
    NUM("max_upload_bytes", 1, 1e13, max_upload_bytes, uint64_t)
#undef NUM
#undef STR
    return ln_errf(e, "unknown option '%s'", key);
}

static int load_config(const char *path, ln_err *e) {
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j) return ln_errf(e, "%s:%d:%d: %s", path, je.line, je.column, je.text);
    if (!json_is_object(j)) {
        json_decref(j);
        return ln_errf(e, "%s: the config must be a JSON object", path);
    }
    const char *k;
    json_t *v;
    int rc = 0;
    json_object_foreach(j, k, v) {
        char text[4096];
        if (json_is_string(v)) snprintf(text, sizeof text, "%s", json_string_value(v));
        else if (json_is_integer(v)) snprintf(text, sizeof text, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v)) snprintf(text, sizeof text, "%.17g", json_real_value(v));
        else if (json_is_boolean(v)) snprintf(text, sizeof text, "%s", json_is_true(v) ? "true" : "false");
        else {
            rc = ln_errf(e, "%s: key '%s' must be a string, number or boolean", path, k);
            break;
        }
        if (set_option(k, text, e) != 0) {
            rc = ln_err_prefix(e, "%s", path);
            break;
        }
    }
    json_decref(j);
    return rc;
}

/* Flags after the subcommand words: --name value pairs, plus positional arguments. */
static int parse_flags(int argc, char **argv, const char **positional, int max_pos, int *npos, const char **project,
                       const char **name, ln_err *e) {
    const char *config = NULL;
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) config = argv[i + 1];
    if (config && load_config(config, e) != 0) return -1;
    *npos = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) {
            if (*npos == max_pos) return ln_errf(e, "unexpected argument '%s'", a);
            positional[(*npos)++] = a;
            continue;
        }
        if (strcmp(a, "--no-access-log") == 0) {
            g_cfg.log_requests = 0;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) return ln_errf(e, "%s needs a value", a);
        const char *v = argv[++i];
        if (strcmp(a, "--config") == 0) continue;
        if (strcmp(a, "--project") == 0 && project) { *project = v; continue; }
        if (strcmp(a, "--name") == 0 && name) { *name = v; continue; }
        char key[64];
        size_t k = 0;
        for (const char *p = a + 2; *p && k + 1 < sizeof key; p++) key[k++] = *p == '-' ? '_' : *p;
        key[k] = 0;
        if (set_option(key, v, e) != 0) return -1;
    }
    return 0;
}

static int open_store(ln_err *e) {
    if (!g_cfg.data_dir[0]) return ln_errf(e, "--data-dir is required");
    if (ln_mkdir_p(g_cfg.data_dir, e) != 0) return -1;
    return store_open(g_cfg.data_dir, g_cfg.migrations_dir, e);
}

static int cmd_keys(int tokens, int argc, char **argv) {
    ln_err e;
    const char *pos[2], *project = NULL, *name = NULL;
    int npos;
    if (argc < 1) {
        usage(stderr);
        return 2;
    }
    const char *verb = argv[0];
    if (parse_flags(argc - 1, argv + 1, pos, 1, &npos, tokens ? NULL : &project, tokens ? &name : NULL, &e) != 0 ||
        open_store(&e) != 0)
        goto fail;
    if (strcmp(verb, "create") == 0) {
        char secret[64], id[40], pid[40];
        if (tokens) {
            if (!name) { ln_errf(&e, "tokens create needs --name NAME"); goto fail; }
            if (auth_token_create(name, secret, id, &e) != 0) goto fail;
            fprintf(stderr, "created worker token %s (%s); it is shown only once:\n", id, name);
        } else {
            if (!project) { ln_errf(&e, "keys create needs --project NAME"); goto fail; }
            if (auth_key_create(project, secret, id, pid, &e) != 0) goto fail;
            fprintf(stderr, "created key %s for project %s (%s); it is shown only once:\n", id, project, pid);
        }
        printf("%s\n", secret);
    } else if (strcmp(verb, "revoke") == 0) {
        if (npos != 1) { ln_errf(&e, "%s revoke needs the id or the secret", tokens ? "tokens" : "keys"); goto fail; }
        if ((tokens ? auth_token_revoke(pos[0], &e) : auth_key_revoke(pos[0], &e)) != 0) goto fail;
        fprintf(stderr, "revoked\n");
    } else if (strcmp(verb, "import") == 0) {
        /* Secrets come on stdin so that they never show in /proc/<pid>/cmdline. */
        char line[512];
        int lineno = 0, added = 0, known = 0;
        if (tokens && !name) { ln_errf(&e, "tokens import needs --name NAME (the token is read from stdin)"); goto fail; }
        while (fgets(line, sizeof line, stdin)) {
            lineno++;
            line[strcspn(line, "\r\n")] = 0;
            char *p = line;
            while (*p == ' ' || *p == '\t') p++;
            if (!*p || *p == '#') continue;
            int a = 0;
            if (tokens) {
                if (auth_token_import(name, p, &a, &e) != 0) { ln_err_prefix(&e, "stdin line %d", lineno); goto fail; }
            } else {
                char proj[128], key[256];
                if (sscanf(p, "%127s %255s", proj, key) != 2) {
                    ln_errf(&e, "stdin line %d: expected 'PROJECT KEY'", lineno);
                    goto fail;
                }
                if (auth_key_import(proj, key, &a, &e) != 0) { ln_err_prefix(&e, "stdin line %d", lineno); goto fail; }
            }
            if (a) added++;
            else known++;
        }
        fprintf(stderr, "imported %d new %s (%d already known)\n", added, tokens ? "token(s)" : "key(s)", known);
    } else if (strcmp(verb, "list") == 0) {
        if (auth_list(tokens, &e) != 0) goto fail;
    } else {
        ln_errf(&e, "unknown subcommand '%s %s'", tokens ? "tokens" : "keys", verb);
        goto fail;
    }
    store_close();
    return 0;
fail:
    fprintf(stderr, "loranull-server: %s\n", e.msg);
    return 2;
}

static int cmd_serve(int argc, char **argv) {
    ln_err e;
    const char *pos[1];
    int npos;
    if (parse_flags(argc, argv, pos, 0, &npos, NULL, NULL, &e) != 0 || open_store(&e) != 0) {
        fprintf(stderr, "loranull-server: %s\n", e.msg);
        return 2;
    }
    /* Signals are taken by sigwait in this thread; every other thread inherits the block. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    api_files_register();
    api_jobs_register();
    api_internal_register();
    api_ops_register();
    api_workers_register();
    int iport = 0;
    if (g_cfg.internal_host[0]) {
        iport = http_start_internal(g_cfg.internal_host, g_cfg.internal_port, g_cfg.threads, &e);
        if (iport < 0) {
            ln_log(LN_LOG_ERROR, "server", "%s", e.msg);
            return 1;
        }
    }
    int port = http_start(g_cfg.listen_host, g_cfg.port, g_cfg.threads, &e);
    if (port < 0 || sched_start(&e) != 0 || jobq_start(&e) != 0) {
        ln_log(LN_LOG_ERROR, "server", "%s", e.msg);
        return 1;
    }
    char kv[400];
    snprintf(kv, sizeof kv, "\"host\":\"%.100s\",\"port\":%d,\"data_dir\":\"%.200s\",\"threads\":%d", g_cfg.listen_host,
             port, g_cfg.data_dir, g_cfg.threads);
    ln_log_kv(LN_LOG_INFO, "server", kv, "listening on %s:%d", g_cfg.listen_host, port);
    if (g_cfg.internal_host[0]) {
        snprintf(kv, sizeof kv, "\"host\":\"%.100s\",\"port\":%d", g_cfg.internal_host, iport);
        ln_log_kv(LN_LOG_INFO, "server", kv, "internal listener (/internal/v1) on %s:%d", g_cfg.internal_host, iport);
    }
    int sig = 0;
    sigwait(&set, &sig);
    ln_log(LN_LOG_INFO, "server", "signal %d: stopping", sig);
    http_stop(sse_shutdown);
    jobq_stop();
    sched_stop();
    store_close();
    ln_log(LN_LOG_INFO, "server", "stopped");
    return 0;
}

int main(int argc, char **argv) {
    defaults();
    if (argc >= 2 && strcmp(argv[1], "keys") == 0) return cmd_keys(0, argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "tokens") == 0) return cmd_keys(1, argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "serve") == 0) return cmd_serve(argc - 2, argv + 2);
    return cmd_serve(argc - 1, argv + 1);
}
