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

/* model.c's rotary tables (rope_ensure: cos and sin, T × head_dim/2 floats each, in the backend's
 * memory) for a model whose longest forward so far had T tokens. */
static double rope_tables(const ln_config *c, double T) {
    return 2 * F32 * T * (double)(c->head_dim / 2);
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

/* What one rank holds of its own: the parts that scale with its config (the whole model's for one
 * rank, a shard's — heads/R, kv heads/R, intermediate/R; hidden, vocab, norms and embeddings whole —
 * for one of R tensor-parallel ranks). */
typedef struct {
    double weights, linear, adapter, optimizer, activations, eval_activations, calib_activations;
} rank_parts;

static void parts_of(const ln_memplan_req *q, const ln_config *c, rank_parts *o) {
    const double C = c->hidden_size, L = c->num_layers, V = c->vocab_size;
    const int full = q->rank <= 0;
    double lin = 0, fac = 0, fac_a = 0;
    int nt = 0;
    for (int t = 0; t < LN_NTARGET; t++) {
        int od, id;
        ln_model_target_dims(c, (ln_target)t, &od, &id);
        lin += (double)od * id;
        if (!(q->targets & (1u << t))) continue;
        nt++;
        fac += (double)q->rank * id + (double)od * q->rank;
        fac_a += (double)q->rank * id;
    }
    /* weights: every linear, the two norms per layer, embedding (+ lm_head), final norm */
    const double params = L * (lin + 2 * C) + V * C * (c->tie_word_embeddings ? 1 : 2) + C;
    o->weights = F32 * params;
    o->linear = F32 * L * lin;
    /* adapter: A, B and their gradients (a frozen A has none) + A0, B0; full fine-tuning: every
     * weight's gradient */
    const double trained = full ? params : L * (fac - (q->train_a ? 0 : fac_a));
    o->adapter = full ? F32 * params : F32 * (L * fac * (q->residual ? 2 : 1) + trained);
    o->optimizer = F32 * 2 * trained;
    /* training: one micro-batch, lm_head in chunks of LN_HEAD_CHUNK trained rows */
    const double N = (double)q->batch * q->seq, chunk = N < LN_HEAD_CHUNK ? N : LN_HEAD_CHUNK;
    o->activations = activations(c, q->batch, q->seq, full ? 0 : q->rank, full ? 0 : nt, q->recompute,
                                 q->rows_only_attention, chunk, ACT_TRAIN);
    o->eval_activations = q->eval_during_training /* its own ln_acts, forward-only, beside the training one */
                              ? activations(c, q->batch, q->seq, full ? 0 : q->rank, full ? 0 : nt, 0,
                                            q->rows_only_attention, chunk, ACT_EVAL)
                              : 0;
    const double T_cal = q->calib_max_length > 0 ? q->calib_max_length : 1024;
    o->calib_activations =
        q->calibrate ? activations(c, 1, T_cal, 0, 0, 0, q->rows_only_attention, 0, ACT_CALIB) : 0;
}

/* One of R ranks' shard config (heads, kv heads and intermediate rounded up where they do not
 * divide — the worker refuses such a split before it plans). */
static ln_config shard_of(const ln_config *c, int R) {
    ln_config sc = *c;
    if (R > 1) {
        sc.num_heads = (c->num_heads + R - 1) / R;
        sc.num_kv_heads = (c->num_kv_heads + R - 1) / R;
        sc.intermediate_size = (c->intermediate_size + R - 1) / R;
    }
    return sc;
}

void ln_memplan_estimate(const ln_memplan_req *q0, ln_memplan *p) {
    memset(p, 0, sizeof *p);
    ln_memplan_req q = *q0;
    if (!q.targets) q.targets = LN_TARGETS_ALL;
    const ln_config *c = q.cfg;
    const double L = c->num_layers;
    const int full = q.rank <= 0;
    const int R = q.ranks > 1 ? q.ranks : 1;
    const int H = q.ranks_here > 0 && q.ranks_here < R ? q.ranks_here : R;
    const int root = R == 1 || q.first_rank <= 0;
    p->ranks = R;
    p->ranks_here = H;
    p->root_here = root;

    /* one rank's shard (the whole model for one rank) */
    ln_config sc = shard_of(c, R);
    rank_parts one, whole;
    parts_of(&q, &sc, &one);
    parts_of(&q, c, &whole);
    p->weights = H * one.weights;
    p->adapter = H * one.adapter;
    p->optimizer = H * one.optimizer;
    p->activations = H * one.activations;
    p->eval_activations = H * one.eval_activations;
    p->calib_activations = H * one.calib_activations;
    p->data = 8.0 * (double)q.data_tokens; /* loaded once per process */
    /* each rank's model keeps the rotary tables of its longest forward: a calibration window's from
     * calibration on (through the init), the longest of that and a training or evaluation batch's
     * in training — they grow, never shrink (model.c's rope_ensure) */
    const double T_cal = q.calib_max_length > 0 ? q.calib_max_length : 1024;
    p->calib_rope = q.calibrate ? H * rope_tables(c, T_cal) : 0;
    p->rope = H * rope_tables(c, q.calibrate && T_cal > q.seq ? T_cal : q.seq);

    /* calibration: the covariances of the distinct (whole) inputs, per layer, on rank 0 */
    double d[LN_NINPUT], dsq = 0, dmax = 0;
    input_widths(c, q.targets, d);
    for (int i = 0; i < LN_NINPUT; i++) {
        dsq += d[i] * d[i];
        if (d[i] > dmax) dmax = d[i];
    }
    if (q.calibrate && root) {
        p->covariances = F64 * L * dsq;
        p->calib_scratch = (q.calib_fp64 ? 0 : F32 * dmax * dmax) + F64 * 256 * dmax;
    }
    if (q.calibrate && R > 1) {
        /* every rank gathers the row-parallel inputs (o's, down's — targeted or not: the hook sees
         * them all) of one window: its block, every rank's blocks, the whole rows
         * (tensor_parallel.c's calibration hook, host memory) */
        const double qs = (double)sc.num_heads * sc.head_dim,
                     drow = qs > sc.intermediate_size ? qs : (double)sc.intermediate_size;
        p->calib_gather = H * F32 * T_cal * drow * (1 + 2.0 * R);
    }

    if (!full && q.method && !strncmp(q.method, "lora_null", 9) && q.calibrate && root)
        p->bases = F64 * L * (d[0] + d[1] + d[2] + d[3]) * q.rank;
    /* the init's scratch is of the whole model's widths (a basis solve, an SVD of a whole weight),
     * counted on every rank: thread ranks spread the solves, but with one rank per process rank 0
     * runs them all and the others hold only a basis and a whole weight's factors (an overcount
     * there, transient and below the training phase's) */
    p->init_scratch = full ? 0 : H * init_scratch(&q, dmax);
    /* rank 0 of several: the whole adapter (gathered; checkpoints, drift, export) */
    if (!full && R > 1 && root) p->gathered_adapter = whole.adapter;
    /* full fine-tuning: the drift tracker's copy of every original weight — on ranks, each its own
     * blocks (tensor_parallel.h's ln_tp_drift for a full fine-tune) */
    p->drift = q.drift && full && q.calibrate ? H * one.linear : 0;

    const double held = p->weights + p->data;
    /* calibration: each sum becomes its covariance in place (calibrate.c), so one set */
    p->phase[LN_PHASE_CALIBRATION] =
        q.calibrate ? held + p->covariances + p->calib_scratch + p->calib_activations + p->calib_gather + p->calib_rope
                    : 0;
    p->phase[LN_PHASE_INIT] =
        held + p->covariances + p->adapter + p->gathered_adapter + p->bases + p->init_scratch + p->calib_rope;
    p->phase[LN_PHASE_TRAINING] = held + p->covariances + p->bases + p->adapter + p->gathered_adapter + p->optimizer +
                                  p->activations + p->eval_activations + p->drift + p->rope;
    for (int i = 0; i < LN_NPHASE; i++)
        if (p->phase[i] > p->peak) {
            p->peak = p->phase[i];
            p->peak_phase = (ln_memplan_phase)i;
        }
}

/* ---------------------------------------------------------------- the check */

/* A part of a plan, and the phases it is held in. */
typedef struct {
    const char *name;
    double v;
    int in[LN_NPHASE];
} plan_row;

/* "<phase>[, ranks a-b of R here]: weights W, <part> X, …" — the peak phase's parts, for the
 * sentences of both plans. */
static void peak_text(char *buf, size_t n, ln_memplan_phase peak, int ranks, int first, int here, double weights,
                      const plan_row *rows, size_t nrows) {
    char a[32];
    int k = snprintf(buf, n, "%s", ln_memplan_phase_name(peak));
    if (ranks > 1) {
        int lo = first > 0 ? first : 0, hi = lo + here - 1;
        k += hi > lo ? snprintf(buf + k, n - (size_t)k, ", ranks %d-%d of %d here", lo, hi, ranks)
                     : snprintf(buf + k, n - (size_t)k, ", rank %d of %d here", lo, ranks);
    }
    k += snprintf(buf + k, n - (size_t)k, ": weights %s", ln_fmt_bytes(weights, a, sizeof a));
    for (size_t i = 0; i < nrows && k < (int)n; i++) {
        if (!rows[i].in[peak] || rows[i].v <= 0) continue;
        k += snprintf(buf + k, n - (size_t)k, ", %s %s", rows[i].name, ln_fmt_bytes(rows[i].v, a, sizeof a));
    }
}

int ln_memplan_check(const ln_memplan_req *q, const char *root, ln_memplan *out, ln_err *e) {
    ln_memplan p;
    ln_memplan_estimate(q, &p);
    int rc = ln_mem_available(root, &p.available, p.available_from, sizeof p.available_from, e);
    if (out) *out = p;
    if (rc != 0) return -1;
    if (p.peak <= p.available) return 0;
    const plan_row rows[] = {
        {"covariances", p.covariances, {1, 1, 1}},   {"calibration scratch", p.calib_scratch, {1, 0, 0}},
        {"calibration activations", p.calib_activations, {1, 0, 0}},
        {"calibration gathers", p.calib_gather, {1, 0, 0}},
        {"adapter and gradients", p.adapter, {0, 1, 1}}, {"gathered adapter", p.gathered_adapter, {0, 1, 1}},
        {"bases", p.bases, {0, 1, 1}},
        {"init scratch", p.init_scratch, {0, 1, 0}},  {"AdamW", p.optimizer, {0, 0, 1}},
        {"activations", p.activations, {0, 0, 1}},
        {"evaluation activations", p.eval_activations, {0, 0, 1}},   {"drift copies", p.drift, {0, 0, 1}},
        {"data", p.data, {1, 1, 1}},
        {"rotary tables", p.calib_rope, {1, 1, 0}},  {"rotary tables", p.rope, {0, 0, 1}},
    };
    char peak[768], need[32], b[32];
    peak_text(peak, sizeof peak, p.peak_phase, p.ranks, q->first_rank, p.ranks_here, p.weights, rows,
              sizeof rows / sizeof *rows);
    return ln_errf(e, "CPU memory plan: the job needs %s at its peak (%s) but only %s are available (%s), so it would "
                      "run out of memory",
                   ln_fmt_bytes(p.peak, need, sizeof need), peak, ln_fmt_bytes(p.available, b, sizeof b),
                   p.available_from);
}

/* ---------------------------------------------------------------- the GPU plan */

int ln_memplan_gpu(const lnb_cuda_plan_req *g, double free_bytes, double device_bytes, const char *device,
                   lnb_cuda_plan *p, ln_err *e) {
    memset(p, 0, sizeof *p);
    p->free_bytes = free_bytes;
    p->device_bytes = device_bytes;
    ln_config c = {.vocab_size = g->vocab, .hidden_size = g->hidden, .intermediate_size = g->intermediate,
                   .num_layers = g->layers, .num_heads = g->heads, .num_kv_heads = g->kv_heads,
                   .head_dim = g->head_dim, .tie_word_embeddings = g->tied};
    unsigned mask = g->target_mask                                ? g->target_mask
                    : g->targets > 0 && g->targets < LN_NTARGET ? (1u << g->targets) - 1
                                                                : LN_TARGETS_ALL;
    /* the CPU plan of the same job on the device's layout: attention rows only (flash-style) */
    ln_memplan_req q = {.cfg = &c, .batch = g->batch, .seq = g->seq, .rank = g->rank, .targets = mask,
                        .train_a = g->train_a, .residual = g->residual, .method = g->method, .calibrate = g->calibrate,
                        .calib_max_length = g->calib_max_length, .calib_fp64 = 1, .recompute = g->recompute,
                        .rows_only_attention = 1, .eval_during_training = g->eval_during_training, .ranks = g->ranks,
                        .ranks_here = g->ranks_here, .first_rank = g->first_rank};
    ln_memplan m;
    ln_memplan_estimate(&q, &m);
    const int H = m.ranks_here, R = m.ranks;
    ln_config sc = shard_of(&c, R);
    /* fp32 masters; bf16 copies of the frozen linears and lm_head (not the embedding, the norms) */
    p->weights = m.weights;
    if (g->bf16_copies) {
        double lin = 0;
        for (int t = 0; t < LN_NTARGET; t++) {
            int o, i;
            ln_model_target_dims(&sc, (ln_target)t, &o, &i);
            lin += (double)o * i;
        }
        p->weights += H * 2.0 * ((double)sc.num_layers * lin + (double)c.vocab_size * c.hidden_size);
    }
    p->adapter = m.adapter;
    p->optimizer = m.optimizer;
    p->gathered_adapter = m.gathered_adapter;
    p->rope = m.rope;
    p->calib_rope = m.calib_rope;
    /* device activations: model.c's, without its host index arrays (malloc); the logits chunk apart */
    const double N = (double)g->batch * g->seq, chunk = N < LN_HEAD_CHUNK ? N : LN_HEAD_CHUNK;
    const double Tc = g->calib_max_length > 0 ? g->calib_max_length : 1024, idx = 4.0 * 4 + 8;
    p->logits = H * F32 * chunk * c.vocab_size;
    p->activations = m.activations > 0 ? m.activations - H * N * idx - p->logits : 0;
    p->eval_activations = m.eval_activations > 0 ? m.eval_activations - H * N * idx : 0;
    p->calib_activations = m.calib_activations > 0 ? m.calib_activations - H * Tc * idx : 0;
    /* attention chunk buffers (attention.cu) + cuBLAS/cuSOLVER workspaces (+ the bf16 image of the
     * largest activation operand, the logits' gradient) */
    p->workspace = 2.0 * (32 << 20) * F32 + 512.0 * (1 << 20) + (g->bf16_copies ? p->logits / 2 : 0);
    /* lora_null_*: cuSOLVER's eigensolve of the widest whole input (the matrix and a workspace of
     * its size) or a factor's fp64 W0 with U, W0 U, P, U Q — one at a time, per rank */
    double din[LN_NINPUT], dmax = 0, worst = 0;
    input_widths(&c, mask, din);
    for (int i = 0; i < LN_NINPUT; i++)
        if (din[i] > dmax) dmax = din[i];
    if (g->rank > 0 && g->method && !strncmp(g->method, "lora_null", 9)) {
        const double r = g->rank;
        worst = F64 * 2 * dmax * dmax;
        for (int t = 0; t < LN_NTARGET; t++) {
            if (!(mask & (1u << t))) continue;
            int o, i;
            ln_model_target_dims(&c, (ln_target)t, &o, &i);
            double f = F64 * ((double)o * i + 2.0 * i * r + 2.0 * o * r + r * r);
            if (f > worst) worst = f;
        }
    }
    p->init_scratch = H * worst;
    /* the covariance sums, opened layer by layer (calibrate.c) while they fit beside the window's
     * forward and the workspaces; the rest sum on the host */
    if (g->calibrate && g->device_covariances && m.root_here) {
        double room = free_bytes - p->weights - p->calib_activations - p->workspace - p->calib_rope;
        for (int l = 0; l < c.num_layers; l++)
            for (int i = 0; i < LN_NINPUT; i++) {
                if (din[i] <= 0) continue;
                double one = F64 * din[i] * din[i] + 512; /* + its flags (cudaMalloc's granule) */
                if (one <= room - p->covariances) p->covariances += one;
                else p->covariances_host += one;
            }
    }
    p->phase[LN_PHASE_CALIBRATION] =
        g->calibrate ? p->weights + p->calib_activations + p->covariances + p->workspace + p->calib_rope : 0;
    p->phase[LN_PHASE_INIT] =
        p->weights + p->adapter + p->gathered_adapter + p->init_scratch + p->workspace + p->calib_rope;
    p->phase[LN_PHASE_TRAINING] = p->weights + p->adapter + p->gathered_adapter + p->optimizer + p->activations +
                                  p->logits + p->eval_activations + p->workspace + p->rope;
    for (int i = 0; i < LN_NPHASE; i++)
        if (p->phase[i] > p->total) {
            p->total = p->phase[i];
            p->peak_phase = i;
        }
    if (p->total <= free_bytes) return 0;

    const plan_row rows[] = {
        {"calibration activations", p->calib_activations, {1, 0, 0}},
        {"covariance sums", p->covariances, {1, 0, 0}},
        {"adapter and gradients", p->adapter, {0, 1, 1}},
        {"gathered adapter", p->gathered_adapter, {0, 1, 1}},
        {"init scratch", p->init_scratch, {0, 1, 0}},
        {"AdamW", p->optimizer, {0, 0, 1}},
        {"activations", p->activations, {0, 0, 1}},
        {"logits", p->logits, {0, 0, 1}},
        {"evaluation activations", p->eval_activations, {0, 0, 1}},
        {"workspace", p->workspace, {1, 1, 1}},
        {"rotary tables", p->calib_rope, {1, 1, 0}},
        {"rotary tables", p->rope, {0, 0, 1}},
    };
    char peak[768], need[32], b[32], d[32];
    peak_text(peak, sizeof peak, (ln_memplan_phase)p->peak_phase, R, g->first_rank, H, p->weights, rows,
              sizeof rows / sizeof *rows);
    return ln_errf(e, "GPU memory plan: the job needs %s at its peak (%s) but only %s of %s are free on %s; %s",
                   ln_fmt_bytes(p->total, need, sizeof need), peak, ln_fmt_bytes(free_bytes, b, sizeof b),
                   ln_fmt_bytes(device_bytes, d, sizeof d), device ? device : "the GPU",
                   p->peak_phase == LN_PHASE_CALIBRATION
                       ? "use a shorter calibration max_length, or more ranks"
                       : p->peak_phase == LN_PHASE_INIT ? "use a smaller adapter rank, or more ranks"
                                                        : "use a smaller batch or sequence, or more ranks");
}
