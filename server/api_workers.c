/* api_workers.c — GET /v1/workers: the workers the dashboard's Workers page shows.
 *
 * Workers are shared by every project, so any API key may list them, but a worker's current jobs
 * are named only when they belong to the caller's project; `busy` says whether it runs any job.
 *
 *   {"object": "list", "data": [{"object": "worker", "id", "name", "device_kind", "devices",
 *     "memory_bytes", "models": [...], "registered_at", "last_heartbeat_at" (unix seconds, fractional),
 *     "status": "alive" | "lost", "busy": bool, "current_jobs": ["ftjob-…"],
 *     "ranks": [{"job_id": "ftjob-…", "world_size": 2, "ranks": [0, 1]}]}], "has_more": false}
 *
 * alive = seen (registered, heartbeat or lease poll) within worker_timeout_s. Alive workers first,
 * then by name; at most WORKERS_MAX of them. */
#include <string.h>

#include "server/api.h"
#include "server/sched.h"
#include "server/server.h"
#include "server/store.h"

#define WORKERS_MAX 1000 /* one page; has_more says when a fleet is larger */

/* Running jobs a worker holds a rank of under the job's current lease generation: "current_jobs"
 * (their ids) and "ranks" (per job, which of its ranks this worker runs), both only for the
 * caller's project. */
static void current_jobs(const char *worker_id, const char *project_id, json_t *w) {
    sqlite3_stmt *st = store_stmt("SELECT j.id, j.project_id, r.rank, j.ranks FROM job_ranks r "
                                  "JOIN jobs j ON j.id=r.job_id WHERE r.worker_id=? AND r.lease_gen=j.lease_gen AND j.status='running' "
                                  "ORDER BY j.seq, r.rank");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    json_t *mine = json_array(), *ranks = json_array(), *cur = NULL;
    int busy = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        busy = 1;
        const char *job = store_col_text(st, 0);
        if (strcmp(store_col_text(st, 1), project_id) != 0) continue;
        if (!cur || strcmp(json_string_value(json_object_get(cur, "job_id")), job) != 0) {
            json_array_append_new(mine, json_string(job));
            cur = json_pack("{s:s, s:I, s:[]}", "job_id", job, "world_size", (json_int_t)sqlite3_column_int64(st, 3),
                            "ranks");
            json_array_append_new(ranks, cur);
        }
        json_array_append_new(json_object_get(cur, "ranks"), json_integer(sqlite3_column_int64(st, 2)));
    }
    sqlite3_reset(st);
    json_object_set_new(w, "busy", json_boolean(busy));
    json_object_set_new(w, "current_jobs", mine);
    json_object_set_new(w, "ranks", ranks);
}

static void models_of(const char *worker_id, json_t *w) {
    sqlite3_stmt *st = store_stmt("SELECT model FROM worker_models WHERE worker_id=? ORDER BY model");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    json_t *models = json_array();
    while (sqlite3_step(st) == SQLITE_ROW) json_array_append_new(models, json_string(store_col_text(st, 0)));
    sqlite3_reset(st);
    json_object_set_new(w, "models", models);
}

static enum MHD_Result workers_list(http_req *r) {
    double alive_after = sched_wall_now() - g_cfg.worker_timeout_s;
    sqlite3_stmt *st = store_stmt("SELECT id, name, device_kind, devices, memory_bytes, registered_at, last_seen_f "
                                  "FROM workers ORDER BY last_seen_f < ?1, name, id LIMIT ?2");
    sqlite3_bind_double(st, 1, alive_after);
    sqlite3_bind_int(st, 2, WORKERS_MAX + 1);
    /* Collect the rows first, then ask per worker (models, jobs) with the other statements. */
    json_t *data = json_array();
    int more = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        if (json_array_size(data) == WORKERS_MAX) {
            more = 1;
            break;
        }
        double seen = sqlite3_column_double(st, 6);
        json_array_append_new(
            data, json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:f, s:s}", "object", "worker", "id",
                            store_col_text(st, 0), "name", store_col_text(st, 1), "device_kind", store_col_text(st, 2),
                            "devices", (json_int_t)sqlite3_column_int64(st, 3), "memory_bytes",
                            (json_int_t)sqlite3_column_int64(st, 4), "registered_at",
                            (json_int_t)sqlite3_column_int64(st, 5), "last_heartbeat_at", seen, "status",
                            seen >= alive_after ? "alive" : "lost"));
    }
    sqlite3_reset(st);
    size_t i;
    json_t *w;
    json_array_foreach(data, i, w) {
        const char *id = json_string_value(json_object_get(w, "id"));
        models_of(id, w);
        current_jobs(id, r->project_id, w);
    }
    return http_json(r, 200, json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", more));
}

void api_workers_register(void) {
    http_route("GET", "/v1/workers", HTTP_AUTH_KEY, HTTP_BODY_NONE, workers_list, "workers_list");
}
