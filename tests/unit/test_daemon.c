/* Unit tests for the worker daemon's parts: the bounded outbox between the job thread and the loop,
 * the model scan, the local checkpoint finder, and wd_http (curl multi on libuv) against a real
 * HTTP server on a loopback socket (libmicrohttpd, one thread per connection). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <microhttpd.h>
#include <pthread.h>

#include "common/util.h"
#include "worker/daemon/wd_http.h"
#include "worker/daemon/wd_models.h"
#include "worker/daemon/wd_outbox.h"
#include "worker/daemon/wd_run.h"

/* ---------------------------------------------------------------- outbox */

static const char *msg_at(json_t *events, size_t i) {
    return json_string_value(json_object_get(json_array_get(events, i), "message"));
}

static void test_outbox_bounds_drop_points_then_info_events(void **state) {
    (void)state;
    wd_outbox o;
    wd_outbox_init(&o, NULL, 3, 2);
    wd_outbox_event(&o, "info", NULL, "i1");
    wd_outbox_event(&o, "warn", NULL, "w1");
    wd_outbox_event(&o, "info", NULL, "i2");
    wd_outbox_event(&o, "info", NULL, "i3");
    wd_outbox_event(&o, "info", NULL, "i4");
    for (int s = 1; s <= 5; s++) wd_outbox_metrics(&o, s, json_pack("{s:f}", "loss", 1.0 / s));
    size_t ne, np;
    wd_outbox_size(&o, &ne, &np);
    assert_int_equal(ne, 3);
    assert_int_equal(np, 2);
    assert_int_equal(wd_outbox_appended(&o), 10);
    json_t *ev, *mt;
    wd_outbox_take(&o, 100, 100, &ev, &mt);
    /* The drop report first, then the warning (never dropped before info events), then the newest. */
    assert_int_equal(json_array_size(ev), 4);
    assert_non_null(strstr(msg_at(ev, 0), "2 event(s) and 3 metric point(s) were dropped"));
    assert_string_equal(msg_at(ev, 1), "w1");
    assert_string_equal(msg_at(ev, 2), "i3");
    assert_string_equal(msg_at(ev, 3), "i4");
    assert_int_equal(json_integer_value(json_object_get(json_array_get(mt, 0), "step")), 4);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(mt, 1), "step")), 5);
    json_decref(ev);
    json_decref(mt);
    wd_outbox_destroy(&o);
}

static void test_outbox_take_caps_and_putback_keeps_order(void **state) {
    (void)state;
    wd_outbox o;
    wd_outbox_init(&o, NULL, 100, 100);
    for (int i = 0; i < 5; i++) wd_outbox_event(&o, "info", NULL, "e%d", i);
    json_t *ev, *mt;
    wd_outbox_take(&o, 2, 10, &ev, &mt);
    assert_int_equal(json_array_size(ev), 2);
    wd_outbox_event(&o, "info", NULL, "late");
    wd_outbox_putback(&o, ev, mt); /* a failed post gives them back in front */
    wd_outbox_take(&o, 100, 100, &ev, &mt);
    const char *want[] = {"e0", "e1", "e2", "e3", "e4", "late"};
    assert_int_equal(json_array_size(ev), 6);
    for (int i = 0; i < 6; i++) assert_string_equal(msg_at(ev, (size_t)i), want[i]);
    json_decref(ev);
    json_decref(mt);
    wd_outbox_destroy(&o);
}

static void test_outbox_metrics_keep_only_numbers(void **state) {
    (void)state;
    wd_outbox o;
    wd_outbox_init(&o, NULL, 10, 10);
    /* (jansson cannot even hold a NaN: json_real(NAN) is NULL, so rows never carry one.) */
    json_t *v = json_pack("{s:f, s:s, s:i, s:[i]}", "loss", 0.5, "name", "x", "n", 3, "list", 1);
    wd_outbox_metrics(&o, 7, v);
    wd_outbox_metrics(&o, 8, json_pack("{s:s}", "only", "text")); /* nothing numeric: no point at all */
    json_t *ev, *mt;
    wd_outbox_take(&o, 10, 10, &ev, &mt);
    assert_int_equal(json_array_size(mt), 1);
    json_t *vals = json_object_get(json_array_get(mt, 0), "values");
    assert_int_equal(json_object_size(vals), 2);
    assert_non_null(json_object_get(vals, "loss"));
    assert_non_null(json_object_get(vals, "n"));
    json_decref(ev);
    json_decref(mt);
    wd_outbox_destroy(&o);
}

static void *append_many(void *arg) {
    wd_outbox *o = arg;
    for (int i = 0; i < 2000; i++) wd_outbox_metrics(o, i, json_pack("{s:i}", "x", i));
    return NULL;
}

static void test_outbox_concurrent_appends_and_takes(void **state) {
    (void)state;
    wd_outbox o;
    wd_outbox_init(&o, NULL, 10, 1000000);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, append_many, &o);
    size_t got = 0;
    for (int k = 0; k < 200; k++) {
        json_t *ev, *mt;
        wd_outbox_take(&o, 10, 37, &ev, &mt);
        got += json_array_size(mt);
        json_decref(ev);
        json_decref(mt);
    }
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    json_t *ev, *mt;
    wd_outbox_take(&o, 10, 1000000, &ev, &mt);
    got += json_array_size(mt);
    json_decref(ev);
    json_decref(mt);
    assert_int_equal(got, 8000);
    wd_outbox_destroy(&o);
}

/* ---------------------------------------------------------------- models, local checkpoints */

static char *make_tmpdir(void) {
    char tmpl[] = "/tmp/ln-test-daemon-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return ln_xstrdup(d);
}

static void touch(const char *dir, const char *name) {
    ln_err e;
    assert_int_equal(ln_mkdir_p(dir, &e), 0);
    char *p = ln_path_join(dir, name);
    assert_int_equal(ln_write_file_atomic(p, "x", 1, &e), 0);
    free(p);
}

static void test_models_scan_lists_complete_model_folders(void **state) {
    (void)state;
    char *root = make_tmpdir();
    char *a = ln_path_join(root, "b-model"), *b = ln_path_join(root, "a-sharded"), *c = ln_path_join(root, "broken");
    touch(a, "config.json");
    touch(a, "model.safetensors");
    touch(b, "config.json");
    touch(b, "model.safetensors.index.json");
    touch(c, "config.json"); /* no weights: not offered */
    touch(root, "README");
    ln_err e;
    json_t *m = wd_models_scan(root, &e);
    assert_non_null(m);
    assert_int_equal(json_array_size(m), 2);
    assert_string_equal(json_string_value(json_array_get(m, 0)), "a-sharded");
    assert_string_equal(json_string_value(json_array_get(m, 1)), "b-model");
    json_decref(m);
    assert_null(wd_models_scan("/nonexistent/models-dir", &e));
    assert_non_null(strstr(e.msg, "/nonexistent/models-dir"));
    free(a);
    free(b);
    free(c);
    free(root);
}

static void test_local_checkpoint_is_the_highest_complete_one(void **state) {
    (void)state;
    char *root = make_tmpdir();
    char out[WD_PATH_MAX];
    assert_int_equal(wd_run_local_checkpoint(root, out), -1);
    char *s10 = ln_path_join(root, "out/checkpoints/step-000010"), *s20 = ln_path_join(root, "out/checkpoints/step-000020");
    char *s30 = ln_path_join(root, "out/checkpoints/step-000030");
    touch(s10, "state.safetensors");
    touch(s20, "state.safetensors");
    touch(s30, "partial.tmp"); /* interrupted while writing: not a checkpoint */
    assert_int_equal(wd_run_local_checkpoint(root, out), 20);
    assert_string_equal(out, s20);
    free(s10);
    free(s20);
    free(s30);
    free(root);
}

/* ---------------------------------------------------------------- wd_http against a real server */

typedef struct upload_acc {
    size_t n;
    uint64_t sum;
} upload_acc;

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                               const char *version, const char *data, size_t *size, void **ctx) {
    (void)cls;
    (void)version;
    if (strcmp(method, "POST") == 0) {
        upload_acc *acc = *ctx;
        if (!acc) {
            *ctx = acc = calloc(1, sizeof *acc);
            return MHD_YES;
        }
        if (*size) {
            for (size_t i = 0; i < *size; i++) acc->sum = acc->sum * 31 + (unsigned char)data[i];
            acc->n += *size;
            *size = 0;
            return MHD_YES;
        }
    }
    upload_acc *acc = *ctx; /* the request's upload, if any: freed here whatever the URL */
    *ctx = NULL;
    const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    char body[256];
    unsigned status = 200;
    if (!auth || strcmp(auth, "Bearer tok") != 0) {
        status = 401;
        snprintf(body, sizeof body, "{\"error\":{\"message\":\"bad token\",\"code\":\"unauthorized\"}}");
    } else if (strcmp(url, "/slow") == 0) {
        usleep(800 * 1000);
        snprintf(body, sizeof body, "slow");
    } else if (strcmp(url, "/fast") == 0) {
        snprintf(body, sizeof body, "fast");
    } else if (strcmp(url, "/file") == 0) {
        static char big[100000];
        for (size_t i = 0; i < sizeof big; i++) big[i] = (char)('a' + i % 26);
        struct MHD_Response *r = MHD_create_response_from_buffer(sizeof big, big, MHD_RESPMEM_PERSISTENT);
        enum MHD_Result res = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        free(acc);
        return res;
    } else if (strcmp(url, "/echo") == 0 && acc) {
        snprintf(body, sizeof body, "{\"n\":%zu,\"sum\":%llu}", acc->n, (unsigned long long)acc->sum);
    } else {
        status = 404;
        snprintf(body, sizeof body, "{\"error\":{\"message\":\"No such thing: %s\",\"code\":\"not_found\"}}", url);
    }
    free(acc);
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_COPY);
    enum MHD_Result res = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return res;
}

typedef struct result {
    long status;
    char body[256];
    char msg[512];
    char code[64];
    int order;
} result;

static int g_done;

static void on_resp(const wd_resp *r, void *ctx) {
    result *x = ctx;
    x->status = r->status;
    snprintf(x->body, sizeof x->body, "%s", r->body);
    wd_resp_message(r, x->msg, sizeof x->msg);
    wd_resp_code(r, x->code, sizeof x->code);
    x->order = ++g_done;
}

static void test_http_concurrent_requests_download_upload_errors(void **state) {
    (void)state;
    struct MHD_Daemon *srv = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD, 0, NULL,
                                              NULL, handler, NULL, MHD_OPTION_END);
    assert_non_null(srv);
    int port = MHD_get_daemon_info(srv, MHD_DAEMON_INFO_BIND_PORT)->port;
    char base[64];
    snprintf(base, sizeof base, "http://127.0.0.1:%d/", port);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ln_err e;
    assert_null(wd_http_new(&loop, "ftp://x", "tok", &e));
    wd_http *h = wd_http_new(&loop, base, "tok", &e);
    assert_non_null(h);
    char *dir = make_tmpdir();
    char *dest = ln_path_join(dir, "got.bin"), *src = ln_path_join(dir, "up.bin");
    char up[70000];
    uint64_t want = 0;
    for (size_t i = 0; i < sizeof up; i++) {
        up[i] = (char)(i * 13);
        want = want * 31 + (unsigned char)up[i];
    }
    assert_int_equal(ln_write_file_atomic(src, up, sizeof up, &e), 0);

    result slow = {0}, fast[3] = {{0}}, file = {0}, missing = {0}, echo = {0}, down404 = {0};
    g_done = 0;
    /* The slow one first: the others must not wait for it (one loop, many transfers). */
    assert_int_equal(wd_http_json(h, "GET", "/slow", NULL, 10, on_resp, &slow), 0);
    for (int i = 0; i < 3; i++) assert_int_equal(wd_http_json(h, "POST", "/fast", json_object(), 10, on_resp, &fast[i]), 0);
    assert_int_equal(wd_http_download(h, "/file", dest, 10, on_resp, &file), 0);
    char *dest404 = ln_path_join(dir, "never.bin");
    assert_int_equal(wd_http_download(h, "/nope", dest404, 10, on_resp, &down404), 0);
    assert_int_equal(wd_http_json(h, "GET", "/missing", NULL, 10, on_resp, &missing), 0);
    assert_int_equal(wd_http_upload(h, "/echo", src, 10, on_resp, &echo), 0);
    assert_int_equal(wd_http_upload(h, "/echo", "/nonexistent/file", 10, on_resp, &echo), -1);
    assert_int_equal(wd_http_pending(h), 8);
    uv_run(&loop, UV_RUN_DEFAULT); /* returns when every transfer is done and curl closed its timer */
    assert_int_equal(g_done, 8);
    assert_int_equal(slow.status, 200);
    assert_string_equal(slow.body, "slow");
    assert_int_equal(slow.order, 8); /* finished last although started first */
    for (int i = 0; i < 3; i++) {
        assert_int_equal(fast[i].status, 200);
        assert_string_equal(fast[i].body, "fast");
    }
    assert_int_equal(file.status, 200);
    char *got;
    size_t n;
    assert_int_equal(ln_read_file(dest, &got, &n, &e), 0);
    assert_int_equal(n, 100000);
    assert_int_equal(got[99999], 'a' + 99999 % 26);
    free(got);
    assert_int_equal(down404.status, 404);
    assert_false(ln_file_exists(dest404)); /* an error body is not the file */
    assert_non_null(strstr(down404.msg, "No such thing: /nope"));
    assert_int_equal(missing.status, 404);
    assert_string_equal(missing.code, "not_found");
    assert_string_equal(missing.msg, "HTTP 404: No such thing: /missing");
    assert_int_equal(echo.status, 200);
    char want_body[128];
    snprintf(want_body, sizeof want_body, "{\"n\":%zu,\"sum\":%llu}", sizeof up, (unsigned long long)want);
    assert_string_equal(echo.body, want_body);

    /* A wrong token is the server's answer, not a transport failure. */
    wd_http *bad = wd_http_new(&loop, base, "other", &e);
    result unauth = {0};
    wd_http_json(bad, "GET", "/fast", NULL, 10, on_resp, &unauth);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(unauth.status, 401);
    assert_string_equal(unauth.code, "unauthorized");
    wd_http_free(bad);

    /* Nobody listening: status 0 and a sentence saying so. */
    MHD_stop_daemon(srv);
    result refused = {0};
    wd_http_json(h, "GET", "/fast", NULL, 10, on_resp, &refused);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(refused.status, 0);
    assert_non_null(strstr(refused.msg, "could not be reached"));

    /* Aborted requests never call back. */
    result never = {0};
    g_done = 0;
    wd_http_json(h, "GET", "/fast", NULL, 10, on_resp, &never);
    wd_http_abort_ctx(h, &never);
    assert_int_equal(wd_http_pending(h), 0);
    wd_http_free(h);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(g_done, 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    unlink(dest);
    unlink(src);
    rmdir(dir);
    free(dest);
    free(dest404);
    free(src);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_outbox_bounds_drop_points_then_info_events),
        cmocka_unit_test(test_outbox_take_caps_and_putback_keeps_order),
        cmocka_unit_test(test_outbox_metrics_keep_only_numbers),
        cmocka_unit_test(test_outbox_concurrent_appends_and_takes),
        cmocka_unit_test(test_models_scan_lists_complete_model_folders),
        cmocka_unit_test(test_local_checkpoint_is_the_highest_complete_one),
        cmocka_unit_test(test_http_concurrent_requests_download_upload_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
