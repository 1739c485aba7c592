/* memplan.c — the CPU job's memory plan (see memplan.h). */
#include "worker/engine/memplan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"

#define F32 4.0
#define F64 8.0

const char *ln_memplan_phase_name(ln_memplan_phase p) {
    static const char *names[LN_NPHASE] = {"calibration", "init", "training"};
    return (unsigned)p < LN_NPHASE ? names[p] : "?";
}

/* ---------------------------------------------------------------- the estimate */

/* What a forward keeps (model.c's acts_ensure): everything a backward needs (ACT_TRAIN), or — for a
 * forward no backward follows — one layer's intermediates and two residual buffers, with the final
 * norm and one chunk of logits (ACT_EVAL: an evaluation's loss) or without (ACT_CALIB). */
enum { ACT_TRAIN, ACT_EVAL, ACT_CALIB };

/* One forward's (+ backward's) buffers for B rows of T tokens in layout mode, as model.c's
 * acts_ensure allocates them (logit_rows rows of logits; r = adapter rank, nt = targets with factors). */
static double activations(const ln_config *c, double B, double T, int r, int nt, int recompute, int rows_only,
                          double logit_rows, int mode) {
    const double C = c->hidden_size, I = c->intermediate_size, L = c->num_layers;
    const double qd = (double)c->num_heads * c->head_dim, kvd = (double)c->num_kv_heads * c->head_dim;
    const double N = B * T, P = B * c->num_heads * T * (rows_only ? 1.0 : T);
    /* h1 rstd1 q k v probs att xmid h2 rstd2 gate up act, then the residual stream (L + 1, or 2) */
    double layer = N * C + N + N * qd + 2 * N * kvd + P + N * qd + 2 * N * C + N + 3 * N * I;
    double kept = recompute || mode != ACT_TRAIN ? 1 : L, res = mode != ACT_TRAIN ? 2 : L + 1;
    double lora = kept * nt * N * r;
    double head = mode == ACT_CALIB ? 0 : N * C + N + logit_rows * c->vocab_size + N * C; /* xf rstdf logits xfc */
    double bwd = mode != ACT_TRAIN ? 0
                                   : N * C + N * (qd > C ? qd : C) + 2 * N * qd + 2 * N * kvd + 3 * N * I +
                                         N * (r > 0 ? r : 1) + T * T; /* dres dh dq datt dk dv dgate dup dact dlh dS */
    return F32 * (kept * layer + res * N * C + lora + head + bwd) + N * (4.0 * 4 + 8); /* + index arrays */
}

/* Widths of the distinct layer inputs the targets read (0 when none reads it). */
static void input_widths(const ln_config *c, unsigned tg, double d[LN_NINPUT]) {
    for (int i = 0; i < LN_NINPUT; i++) d[i] = 0;
    for (int t = 0; t < LN_NTARGET; t++) {
        if (!(tg & (1u << t))) continue;
        int dout, din;
        ln_model_target_dims(c, (ln_target)t, &dout, &din);
        d[ln_target_input((ln_target)t)] = din;
    }
}

/* The largest one-layer scratch of a method's init (lora_init.c), bytes. */
static double init_scratch(const ln_memplan_req *q, double d_max) {
    const ln_config *c = q->cfg;
    const char *me = q->method ? q->method : "lora";
    const double r = q->rank;
    double worst = 0;
    for (int t = 0; t < LN_NTARGET; t++) {
        if (!(q->targets & (1u << t))) continue;
        int o, i;
        ln_model_target_dims(c, (ln_target)t, &o, &i);
        const double dout = o, din = i, k = o < i ? o : i, w = dout * din;
        double s = 0;
        if (!strcmp(me, "pissa") || !strcmp(me, "milora")) /* fp64 W, LAPACKE's copy, U, Vt (+ copies), work */
            s = F64 * (2 * w + 2 * (dout * k + k * din) + 7 * k * k);
        else if (!strcmp(me, "corda")) /* + C' fp64, three fp32 d² for the damped inverse, W C' */
            s = F64 * (3 * w + 2 * (dout * k + k * din) + 7 * k * k + 2 * din * din) + F32 * 3 * din * din;
        else if (!strncmp(me, "lora_null", 9)) /* factor: W0 U, P, U Q, a row block */
            s = F64 * (2 * dout * r + din * r + 256 * din + r * r);
        if (q->residual) s = s > F64 * (dout * r + r * din + 256 * din) ? s : F64 * (dout * r + r * din + 256 * din);
        if (s > worst) worst = s;
    }
    if (!strncmp(me, "lora_null", 9)) { /* one basis solve: the init runs more at once only when they fit */
        double solve = ln_nullspace_basis_scratch((int)d_max, q->rank) + F64 * d_max * r;
        if (solve > worst) worst = solve;
    }
    return worst;
}

void ln_memplan_estimate(const ln_memplan_req *q0, ln_memplan *p) {
    memset(p, 0, sizeof *p);
    ln_memplan_req q = *q0;
    if (!q.targets) q.targets = LN_TARGETS_ALL;
    const ln_config *c = q.cfg;
    const double C = c->hidden_size, L = c->num_layers, V = c->vocab_size;
    const int full = q.rank <= 0;

    /* weights: every linear, the two norms per layer, embedding (+ lm_head), final norm */
    double lin = 0, fac = 0, fac_a = 0;
    int nt = 0;
    for (int t = 0; t < LN_NTARGET; t++) {
        int o, i;
        ln_model_target_dims(c, (ln_target)t, &o, &i);
        lin += (double)o * i;
        if (!(q.targets & (1u << t))) continue;
        nt++;
        fac += (double)q.rank * i + (double)o * q.rank;
        fac_a += (double)q.rank * i;
    }
    const double params = L * (lin + 2 * C) + V * C * (c->tie_word_embeddings ? 1 : 2) + C;
    p->weights = F32 * params;
    p->data = 8.0 * (double)q.data_tokens;

    /* calibration: the covariances of the distinct inputs, per layer */
    double d[LN_NINPUT], dsq = 0, dmax = 0;
    input_widths(c, q.targets, d);
    for (int i = 0; i < LN_NINPUT; i++) {
        dsq += d[i] * d[i];
        if (d[i] > dmax) dmax = d[i];
    }
    const double T_cal = q.calib_max_length > 0 ? q.calib_max_length : 1024;
    if (q.calibrate) {
        p->covariances = F64 * L * dsq;
        p->calib_scratch = (q.calib_fp64 ? 0 : F32 * dmax * dmax) + F64 * 256 * dmax;
        p->calib_activations = activations(c, 1, T_cal, 0, 0, 0, q.rows_only_attention, 0, ACT_CALIB);
    }

    /* adapter: A, B and their gradients (a frozen A has none) + A0, B0; full fine-tuning: every
     * weight's gradient */
    const double trained = full ? params : L * (fac - (q.train_a ? 0 : fac_a));
    p->adapter = full ? F32 * params : F32 * (L * fac * (q.residual ? 2 : 1) + trained);
    p->optimizer = F32 * 2 * trained;
    if (!full && q.method && !strncmp(q.method, "lora_null", 9) && q.calibrate)
        p->bases = F64 * L * (d[0] + d[1] + d[2] + d[3]) * q.rank;
    p->init_scratch = full ? 0 : init_scratch(&q, dmax);

    /* training: one micro-batch, lm_head in chunks of LN_HEAD_CHUNK trained rows */
    const double N = (double)q.batch * q.seq, chunk = N < LN_HEAD_CHUNK ? N : LN_HEAD_CHUNK;
    p->activations = activations(c, q.batch, q.seq, full ? 0 : q.rank, full ? 0 : nt, q.recompute,
                                 q.rows_only_attention, chunk, ACT_TRAIN);
    if (q.eval_during_training) /* its own ln_acts, forward-only, alive beside the training one */
        p->eval_activations = activations(c, q.batch, q.seq, full ? 0 : q.rank, full ? 0 : nt, 0,
                                          q.rows_only_attention, chunk, ACT_EVAL);
    p->drift = q.drift && full && q.calibrate ? F32 * L * lin : 0;

    const double held = p->weights + p->data;
    /* calibration: each sum becomes its covariance in place (calibrate.c), so one set */
    p->phase[LN_PHASE_CALIBRATION] = q.calibrate ? held + p->covariances + p->calib_scratch + p->calib_activations : 0;
    p->phase[LN_PHASE_INIT] = held + p->covariances + p->adapter + p->bases + p->init_scratch;
    p->phase[LN_PHASE_TRAINING] =
        held + p->covariances + p->bases + p->adapter + p->optimizer + p->activations + p->eval_activations + p->drift;
    for (int i = 0; i < LN_NPHASE; i++)
        if (p->phase[i] > p->peak) {
            p->peak = p->phase[i];
            p->peak_phase = (ln_memplan_phase)i;
        }
}

/* ---------------------------------------------------------------- the check */

int ln_memplan_check(const ln_memplan_req *q, const char *root, ln_memplan *out, ln_err *e) {
    ln_memplan p;
    ln_memplan_estimate(q, &p);
    int rc = ln_mem_available(root, &p.available, p.available_from, sizeof p.available_from, e);
    if (out) *out = p;
    if (rc != 0) return -1;
    if (p.peak <= p.available) return 0;
    /* the parts of the peak phase */
    char parts[640], a[32], b[32];
    int k = snprintf(parts, sizeof parts, "weights %s", ln_fmt_bytes(p.weights, a, sizeof a));
    struct {
        const char *name;
        double v;
        int in[LN_NPHASE];
    } rows[] = {
        {"covariances", p.covariances, {1, 1, 1}},   {"calibration scratch", p.calib_scratch, {1, 0, 0}},
        {"calibration activations", p.calib_activations, {1, 0, 0}},
        {"adapter and gradients", p.adapter, {0, 1, 1}}, {"bases", p.bases, {0, 1, 1}},
        {"init scratch", p.init_scratch, {0, 1, 0}},  {"AdamW", p.optimizer, {0, 0, 1}},
        {"activations", p.activations, {0, 0, 1}},
        {"evaluation activations", p.eval_activations, {0, 0, 1}},   {"drift copies", p.drift, {0, 0, 1}},
        {"data", p.data, {1, 1, 1}},
    };
    for (size_t i = 0; i < sizeof rows / sizeof *rows && k < (int)sizeof parts; i++) {
        if (!rows[i].in[p.peak_phase] || rows[i].v <= 0) continue;
        k += snprintf(parts + k, sizeof parts - (size_t)k, ", %s %s", rows[i].name,
                      ln_fmt_bytes(rows[i].v, a, sizeof a));
    }
    char need[32];
    return ln_errf(e, "CPU memory plan: the job needs %s at its peak (%s: %s) but only %s are available (%s), so it "
                      "would run out of memory",
                   ln_fmt_bytes(p.peak, need, sizeof need), ln_memplan_phase_name(p.peak_phase), parts,
                   ln_fmt_bytes(p.available, b, sizeof b), p.available_from);
}
