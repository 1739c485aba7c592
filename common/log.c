#include "common/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static ln_log_level g_level = LN_LOG_INFO;
static int g_plain = 0;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static const char *names[] = {"debug", "info", "warn", "error"};

void ln_log_set_level(ln_log_level lvl) { g_level = lvl; }
void ln_log_set_plain(int plain) { g_plain = plain; }

/* Writes s as the body of a JSON string (escapes quotes, backslashes, control bytes). */
static void json_escape(FILE *f, const char *s) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
}

static void vlog(ln_log_level lvl, const char *comp, const char *kv, const char *fmt, va_list ap) {
    if (lvl < g_level) return;
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    pthread_mutex_lock(&g_mu);
    if (g_plain) {
        fprintf(stderr, "%s: %s\n", comp, msg);
    } else {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        struct tm tm;
        gmtime_r(&tv.tv_sec, &tm);
        char ts[32];
        strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
        fprintf(stderr, "{\"ts\":\"%s.%03dZ\",\"level\":\"%s\",\"comp\":\"", ts, (int)(tv.tv_usec / 1000), names[lvl]);
        json_escape(stderr, comp);
        fputs("\",\"msg\":\"", stderr);
        json_escape(stderr, msg);
        fputc('"', stderr);
        if (kv && *kv) fprintf(stderr, ",%s", kv);
        fputs("}\n", stderr);
    }
    fflush(stderr);
    pthread_mutex_unlock(&g_mu);
}

void ln_log(ln_log_level lvl, const char *comp, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog(lvl, comp, NULL, fmt, ap);
    va_end(ap);
}

void ln_log_kv(ln_log_level lvl, const char *comp, const char *kv, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog(lvl, comp, kv, fmt, ap);
    va_end(ap);
}
