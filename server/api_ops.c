/* api_ops.c — operations endpoints and the dashboard's static files:
 *   GET /healthz  200 while the process serves            GET /readyz  200 when the database is writable
 *   GET /metrics  Prometheus text                         GET / and /static/<path>  from --static-dir
 *   GET /vendor/chart.js  Debian's Chart.js from --chartjs-dir */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "server/api.h"
#include "server/jobq.h"
#include "server/sched.h"
#include "server/server.h"
#include "server/sse.h"
#include "server/store.h"

static enum MHD_Result healthz(http_req *r) {
    return http_json(r, 200, json_pack("{s:s}", "status", "ok"));
}

static enum MHD_Result readyz(http_req *r) {
    ln_err e;
    if (http_stopping()) return http_json(r, 503, json_pack("{s:s, s:s}", "status", "stopping", "reason", "server is shutting down"));
    if (store_probe_writable(&e) != 0)
        return http_json(r, 503, json_pack("{s:s, s:s}", "status", "unavailable", "reason", e.msg));
    return http_json(r, 200, json_pack("{s:s}", "status", "ready"));
}

static enum MHD_Result metrics(http_req *r) {
    size_t len = 0, cap = 16384;
    char *b = ln_xmalloc(cap);
    b[0] = 0;
    static const char *statuses[] = {"validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"};
    long long counts[7] = {0};
    sqlite3_stmt *st = store_stmt("SELECT status, COUNT(*) FROM jobs GROUP BY status");
    while (sqlite3_step(st) == SQLITE_ROW)
        for (int i = 0; i < 7; i++)
            if (strcmp(store_col_text(st, 0), statuses[i]) == 0) counts[i] = sqlite3_column_int64(st, 1);
    sqlite3_reset(st);
    http_buf_printf(&b, &len, &cap, "# HELP loranull_jobs Jobs by status.\n# TYPE loranull_jobs gauge\n");
    for (int i = 0; i < 7; i++) http_buf_printf(&b, &len, &cap, "loranull_jobs{status=\"%s\"} %lld\n", statuses[i], counts[i]);
    st = store_stmt("SELECT COUNT(*) FROM jobs WHERE status='queued' AND not_before_f<=?");
    sqlite3_bind_double(st, 1, sched_wall_now());
    sqlite3_step(st);
    http_buf_printf(&b, &len, &cap,
                    "# HELP loranull_queue_depth Queued jobs ready to be leased now.\n# TYPE loranull_queue_depth gauge\n"
                    "loranull_queue_depth %lld\n", (long long)sqlite3_column_int64(st, 0));
    sqlite3_reset(st);
    st = store_stmt("SELECT COUNT(*), COALESCE(SUM(devices),0) FROM workers WHERE last_seen_f>=?");
    sqlite3_bind_double(st, 1, sched_wall_now() - g_cfg.worker_timeout_s);
    sqlite3_step(st);
    http_buf_printf(&b, &len, &cap,
                    "# HELP loranull_workers_alive Workers seen within worker_timeout_s.\n"
                    "# TYPE loranull_workers_alive gauge\nloranull_workers_alive %lld\n"
                    "# HELP loranull_worker_devices Devices of the live workers.\n"
                    "# TYPE loranull_worker_devices gauge\nloranull_worker_devices %lld\n",
                    (long long)sqlite3_column_int64(st, 0), (long long)sqlite3_column_int64(st, 1));
    sqlite3_reset(st);
    http_buf_printf(&b, &len, &cap,
                    "# HELP loranull_sse_streams Open event streams.\n# TYPE loranull_sse_streams gauge\n"
                    "loranull_sse_streams %d\n", sse_client_count());
    http_buf_printf(&b, &len, &cap,
                    "# HELP loranull_jobs_created_total Jobs accepted (201) since the server started.\n"
                    "# TYPE loranull_jobs_created_total counter\nloranull_jobs_created_total %lu\n",
                    jobq_created_total());
    sched_metrics_render(&b, &len, &cap);
    http_metrics_render(&b, &len, &cap);
    enum MHD_Result res = http_text(r, 200, "text/plain; version=0.0.4; charset=utf-8", b, len);
    free(b);
    return res;
}

/* ---------------------------------------------------------------- static files */

static const char *mime_of(const char *path) {
    const char *dot = strrchr(path, '.');
    static const char *const map[][2] = {{".html", "text/html; charset=utf-8"}, {".js", "text/javascript; charset=utf-8"},
                                         {".mjs", "text/javascript; charset=utf-8"}, {".css", "text/css; charset=utf-8"},
                                         {".json", "application/json"}, {".svg", "image/svg+xml"}, {".png", "image/png"},
                                         {".ico", "image/x-icon"}, {".txt", "text/plain; charset=utf-8"},
                                         {".map", "application/json"}};
    for (size_t i = 0; dot && i < sizeof map / sizeof map[0]; i++)
        if (strcmp(dot, map[i][0]) == 0) return map[i][1];
    return "application/octet-stream";
}

/* Serves rel (already checked: segments of [A-Za-z0-9._-], none starting with '.') from dir, and
 * only if its real path stays inside the real dir (a symlink cannot lead out). */
static enum MHD_Result serve_under(http_req *r, const char *dir, const char *rel) {
    char real_dir[PATH_MAX], real_file[PATH_MAX];
    char *joined = ln_path_join(dir, rel);
    int ok = realpath(dir, real_dir) && realpath(joined, real_file);
    free(joined);
    size_t dl = ok ? strlen(real_dir) : 0;
    if (!ok || strncmp(real_file, real_dir, dl) != 0 || real_file[dl] != '/')
        return http_error(r, 404, "invalid_request_error", "not_found", NULL, "No such file: %.200s.", r->path);
    return http_file(r, real_file, mime_of(real_file), NULL);
}

static int safe_rel_path(const char *p) {
    if (!*p || strlen(p) > 255) return 0;
    int seg_start = 1;
    for (; *p; p++) {
        if (seg_start && (*p == '.' || *p == '/')) return 0; /* no "..", no hidden files, no "//" */
        seg_start = *p == '/';
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_' ||
              *p == '-' || *p == '.' || *p == '/'))
            return 0;
    }
    return !seg_start;
}

static enum MHD_Result static_index(http_req *r) { return serve_under(r, g_cfg.static_dir, "index.html"); }

static enum MHD_Result static_file(http_req *r) {
    const char *rel = r->path + strlen("/static/");
    if (!safe_rel_path(rel)) return http_error(r, 404, "invalid_request_error", "not_found", NULL, "No such file.");
    return serve_under(r, g_cfg.static_dir, rel);
}

static enum MHD_Result chartjs(http_req *r) {
    static const char *const names[] = {"chart.umd.js", "chart.min.js", "Chart.min.js", "chart.js"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *p = ln_path_join(g_cfg.chartjs_dir, names[i]);
        int exists = ln_file_exists(p);
        free(p);
        if (exists) return serve_under(r, g_cfg.chartjs_dir, names[i]);
    }
    return http_error(r, 404, "invalid_request_error", "not_found", NULL,
                      "Chart.js is not installed in %s (Debian package libjs-chart.js; see --chartjs-dir).",
                      g_cfg.chartjs_dir);
}

void api_ops_register(void) {
    http_route("GET", "/healthz", HTTP_AUTH_NONE, HTTP_BODY_NONE, healthz, "healthz");
    http_route("GET", "/readyz", HTTP_AUTH_NONE, HTTP_BODY_NONE, readyz, "readyz");
    http_route("GET", "/metrics", HTTP_AUTH_NONE, HTTP_BODY_NONE, metrics, "metrics");
    http_route("GET", "/", HTTP_AUTH_NONE, HTTP_BODY_NONE, static_index, "static");
    http_route("GET", "/index.html", HTTP_AUTH_NONE, HTTP_BODY_NONE, static_index, "static");
    http_route("GET", "/static/*", HTTP_AUTH_NONE, HTTP_BODY_NONE, static_file, "static");
    http_route("GET", "/vendor/chart.js", HTTP_AUTH_NONE, HTTP_BODY_NONE, chartjs, "static");
}
