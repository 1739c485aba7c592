/* log.h — structured logs: one JSON object a line on stderr.
 * {"ts":"2026-11-28T09:00:00.123Z","level":"info","comp":"server","msg":"..."}
 * Extra fields can ride along as a pre-rendered JSON fragment (ln_log_kv). */
#ifndef LN_LOG_H
#define LN_LOG_H

typedef enum { LN_LOG_DEBUG, LN_LOG_INFO, LN_LOG_WARN, LN_LOG_ERROR } ln_log_level;

void ln_log_set_level(ln_log_level lvl);
/* When plain is set (a terminal user of the CLI), lines are "level: msg" instead of JSON. */
void ln_log_set_plain(int plain);
void ln_log(ln_log_level lvl, const char *comp, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* kv is a JSON fragment without braces, e.g. "\"request_id\":\"r1\",\"status\":200", or NULL. */
void ln_log_kv(ln_log_level lvl, const char *comp, const char *kv, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
