// metrics.js — a job's metric series as the dashboard reads them.
//
// Two sources feed one store, merged by (name, step):
//  - GET /v1/fine_tuning/jobs/{id}/metrics[?after_step=N]: [{name, steps[], values[]}] (what a worker
//    posts as "metrics": [{step, values: {name: x}}] on /internal/v1/jobs/{id}/events);
//  - job events of type "metrics" whose data is a training row {"step": n, name: x, …}, as OpenAI's
//    fine-tuning events carry them; a nested object {"knowledge_drift": {layer: x}} is per-layer.
//    (loranull-worker posts every row as points and every few steps an event with
//    {step, train_loss, total_steps, valid_loss?, knowledge_drift_mean?}.)
//
// Names the dashboard understands (the first present of each list is used):
//   train loss       train_loss | loss
//   validation loss  valid_loss | val_loss | validation_loss | eval_loss
//   learning rate    lr | learning_rate
//   tokens/s         tokens_per_s | train_tokens_per_s
//   progress         progress (0..1), else step / total_steps
//   ETA              eta_s, else the job's estimated_finish, else extrapolated from elapsed_s
//   drift per layer  knowledge_drift/<layer> (also "." or ":" after knowledge_drift), layer like
//                    model.layers.3.q_proj; knowledge_drift_mean / _max over layers.

export const M = {
  trainLoss: ["train_loss", "loss"],
  validLoss: ["valid_loss", "val_loss", "validation_loss", "eval_loss"],
  lr: ["lr", "learning_rate"],
  tokensPerS: ["tokens_per_s", "train_tokens_per_s"],
  progress: ["progress"],
  totalSteps: ["total_steps"],
  eta: ["eta_s"],
  elapsed: ["elapsed_s"],
  driftMean: ["knowledge_drift_mean"],
  driftMax: ["knowledge_drift_max"],
};
const DRIFT = /^knowledge_drift[/.:](.+)$/;
const MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
// Values at steps this close to the newest are read again on refresh: a validation loss or a drift
// measurement may arrive after later training steps were already posted.
const REREAD_STEPS = 20;

export class MetricStore {
  constructor(jobId, call) {
    this.jobId = jobId;
    this.call = call;
    this.series = new Map(); // name → Map(step → value)
    this.maxStep = -1;
    this.polledStep = -1;    // the newest step read from …/metrics (events do not move it)
    this.version = 0;        // bumped on every change, so views redraw only when needed
  }

  add(name, step, value) {
    if (typeof value !== "number" || !isFinite(value) || !Number.isInteger(step)) return;
    let s = this.series.get(name);
    if (!s) this.series.set(name, (s = new Map()));
    if (s.get(step) === value) return;
    s.set(step, value);
    if (step > this.maxStep) this.maxStep = step;
    this.version++;
  }

  // A training row from a "metrics" event: {"step": n, "train_loss": x, "knowledge_drift": {…}, …}.
  addRow(row) {
    const step = row && row.step;
    if (!Number.isInteger(step)) return;
    for (const [k, v] of Object.entries(row)) {
      if (k === "step") continue;
      if (v && typeof v === "object" && !Array.isArray(v)) {
        for (const [sub, x] of Object.entries(v)) this.add(`${k}/${sub}`, step, x);
      } else {
        this.add(k, step, v);
      }
    }
  }

  async refresh(signal) {
    // The cursor is the newest step this endpoint returned, not the newest step any source gave:
    // step events over SSE run ahead of the points, which must still all be read.
    const after = this.polledStep - REREAD_STEPS;
    const q = after >= 0 ? `?after_step=${after}` : "";
    const body = await this.call(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/metrics${q}`, { signal });
    for (const s of body.data || []) {
      const n = Math.min(s.steps.length, s.values.length);
      for (let i = 0; i < n; i++) {
        this.add(s.name, s.steps[i], s.values[i]);
        if (s.steps[i] > this.polledStep) this.polledStep = s.steps[i];
      }
    }
    return this;
  }

  // The union of the aliases' series (step → value; at a step two of them share, the first alias
  // wins): a worker may post "loss" as a metric point every step and "train_loss" in a step event
  // every few steps, and both are the same curve.
  merged(aliases) {
    const present = aliases.filter((a) => this.series.has(a));
    if (present.length <= 1) return present.length ? this.series.get(present[0]) : null;
    const out = new Map();
    for (const a of present) for (const [k, v] of this.series.get(a)) if (!out.has(k)) out.set(k, v);
    return out;
  }

  // [{x: step, y: value}] ascending by step.
  points(aliases) {
    const s = this.merged(aliases);
    if (!s) return [];
    return [...s.entries()].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({ x, y }));
  }

  latest(aliases) {
    const s = this.merged(aliases);
    if (!s || !s.size) return null;
    let step = -1;
    for (const k of s.keys()) if (k > step) step = k;
    return { step, value: s.get(step) };
  }

  // Per-layer drift: [{layer, points: Map(step → value)}], model order (layer index, then q…down).
  driftLayers() {
    const out = [];
    for (const [name, s] of this.series) {
      const m = DRIFT.exec(name);
      if (m) out.push({ layer: m[1], points: s });
    }
    const key = (layer) => {
      const m = /layers\.(\d+)\.(?:[a-z_]+\.)?([a-z_]+)$/.exec(layer);
      if (!m) return [Infinity, 0, layer];
      const mod = MODULE_ORDER.indexOf(m[2]);
      return [Number(m[1]), mod < 0 ? 99 : mod, layer];
    };
    out.sort((a, b) => {
      const ka = key(a.layer), kb = key(b.layer);
      return ka[0] - kb[0] || ka[1] - kb[1] || (ka[2] < kb[2] ? -1 : ka[2] > kb[2] ? 1 : 0);
    });
    return out;
  }

  // {progress: 0..1 | null, tokensPerS, etaS} for the jobs table and the job header.
  summary(job) {
    const now = Date.now() / 1000;
    if (job.status === "succeeded") return { progress: 1, tokensPerS: this.latest(M.tokensPerS)?.value ?? null, etaS: 0 };
    let progress = this.latest(M.progress)?.value ?? null;
    const total = this.latest(M.totalSteps)?.value;
    if (progress === null && total > 0) {
      const step = this.latest(M.trainLoss)?.step ?? this.maxStep;
      if (step >= 0) progress = step / total;
    }
    if (progress !== null) progress = Math.min(1, Math.max(0, progress));
    let etaS = this.latest(M.eta)?.value ?? null;
    if (etaS === null && job.estimated_finish) etaS = job.estimated_finish - now;
    if (etaS === null && progress > 0 && progress < 1 && job.status === "running") {
      const elapsed = this.latest(M.elapsed)?.value ?? (job.started_at ? now - job.started_at : null);
      if (elapsed !== null) etaS = elapsed * (1 - progress) / progress;
    }
    return { progress, tokensPerS: this.latest(M.tokensPerS)?.value ?? null, etaS };
  }
}
