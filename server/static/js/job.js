// job.js — one job: its spec and hyperparameters, the stage timeline, live charts (loss, learning
// rate, knowledge drift), the events log, checkpoints, artifacts, and cancel / pause / resume.
//
// Live data: the event stream (SSE, api.js) delivers every event from the first; each event may
// move the stage or the status, and "metrics" events carry training rows for the charts. Metric
// points that workers post without an event are read from …/metrics every 2 s while the job runs.
//
// Stages: an event with data {"stage": "<name>"} enters that stage (also accepted: a message that
// starts with the stage's word, e.g. "Calibrating on 256 samples"). validating is the server's own
// validating_files status.
import { call, streamJobEvents, downloadFile, ApiError } from "./api.js";
import { MetricStore, M } from "./metrics.js";
import { LineChart, DriftHeatmap } from "./charts.js";
import { progressCell } from "./jobs.js";
import { el, clear, badge, fmtTime, fmtDuration, fmtNum, fmtRate, fmtBytes, TERMINAL, confirmAction, every } from "./util.js";

const STAGES = ["validating", "calibrating", "initialising", "training", "evaluating", "exporting"];
// Without data.stage, a message's first words name its stage (in this order; the first match wins).
// They follow what loranull-worker says ("Calibrating on up to 256 samples…", "Initialised the
// lora_null_v2 adapter…", "Step 10/100: training loss…", "After training: task loss…", "Exported…").
const STAGE_WORDS = [
  [/^training data validated/i, 0], [/^validat/i, 0], [/^calibrat/i, 1],
  [/^(initiali[sz]|restored the .*adapter|full fine-tuning)/i, 2],
  [/^(before training|training\b|step \d+\/\d+)/i, 3], [/^(evaluat|after training)/i, 4], [/^export/i, 5],
];
const METRICS_MS = 2000;
const JOB_MS = 3000;
const MAX_LOG = 500;

function stageOf(ev) {
  const s = ev.data && typeof ev.data.stage === "string" ? ev.data.stage.toLowerCase().replace("initializ", "initialis") : null;
  if (s) {
    const i = STAGES.findIndex((name) => s.startsWith(name.slice(0, 6)));
    if (i >= 0) return i;
  }
  for (const [re, i] of STAGE_WORDS) if (re.test(ev.message || "")) return i;
  return -1;
}

function isStepRow(ev) {
  return ev.type === "metrics" && ev.data && Number.isInteger(ev.data.step);
}

export function render(main, [jobId]) {
  const abort = new AbortController();
  const store = new MetricStore(jobId, call);
  const st = {
    job: null, events: [], stage: -1, stageAt: new Array(STAGES.length).fill(null),
    drawnVersion: -1, finalMetrics: false, files: new Map(), ckptCount: -1, showMetricEvents: false, notFound: false,
  };
  const stops = [];
  let stream = null;

  // ---- layout
  const title = el("h1", jobId);
  const statusSlot = el("span", { id: "job-status" });
  const live = el("span.muted", { id: "live-state" });
  const actions = {
    pause: el("button.secondary", { type: "button", id: "btn-pause" }, "Pause"),
    resume: el("button.secondary", { type: "button", id: "btn-resume" }, "Resume"),
    cancel: el("button.danger", { type: "button", id: "btn-cancel" }, "Cancel"),
  };
  const actionError = el("div.notice.error", { role: "alert", hidden: true });
  const overview = el("table.kv", { id: "job-overview" });
  const specTable = el("table.kv", { id: "job-spec" });
  const timeline = el("ol.timeline", { id: "timeline" });
  const placement = el("div", { id: "placement" });
  const lossChart = new LineChart("Loss", [{ label: "train", color: "--c1" }, { label: "validation", color: "--c2" }],
                                  { id: "chart-loss" });
  const lrChart = new LineChart("Learning rate", [{ label: "learning rate", color: "--c3" }], { id: "chart-lr" });
  const driftChart = new LineChart("Knowledge drift over layers",
                                   [{ label: "mean", color: "--c4" }, { label: "max", color: "--c5" }],
                                   { id: "chart-drift", emptyText: "No drift measured yet." });
  const heatmap = new DriftHeatmap();
  const logList = el("ul");
  const logToggle = el("input", { type: "checkbox", id: "show-metric-events" });
  const ckptBody = el("tbody");
  const artifacts = el("ul", { id: "artifacts" });

  logToggle.addEventListener("change", () => { st.showMetricEvents = logToggle.checked; renderLog(); });

  main.appendChild(el("section", { id: "job-page", "data-job-id": jobId },
    el("div.toolbar", el("a", { href: "#/jobs" }, "← Jobs"), el("span.spacer"), live),
    el("div.toolbar", title, statusSlot, el("span.spacer"), actions.pause, actions.resume, actions.cancel),
    actionError,
    el("div.panel", el("h2", "Stages"), timeline),
    el("div.panel", el("h2", "Placement"), placement),
    el("div.grid2",
      el("div.panel", el("h2", "Overview"), overview),
      el("div.panel", el("h2", "Spec and hyperparameters"), specTable)),
    el("div.stack"),
    el("div.grid2", lossChart.node, lrChart.node),
    el("div.stack"),
    el("div.grid2", driftChart.node, heatmap.node),
    el("div.stack"),
    el("div.grid2",
      el("div.panel",
        el("div.toolbar", el("h2", { style: "margin:0" }, "Events"), el("span.spacer"),
           el("label.muted", logToggle, " step metrics")),
        el("div.events", { id: "events" }, logList)),
      el("div",
        el("div.panel", el("h2", "Checkpoints"),
          el("div.scroll-x", el("table", { id: "checkpoints" },
            el("thead", el("tr", el("th", "Step"), el("th", "Saved"), el("th", "Loss"), el("th", "Files"))), ckptBody))),
        el("div.panel", el("h2", "Artifacts"), artifacts)))));

  // ---- actions
  const ACTIONS = {
    cancel: ["Cancel this job?", "The job stops at its next step and cannot be resumed.", "Cancel job", true],
    pause: ["Pause this job?", "The worker saves a checkpoint and releases the job; resume continues from it.", "Pause job", false],
    resume: ["Resume this job?", "The job is queued again and continues from its last checkpoint.", "Resume job", false],
  };
  for (const [verb, [t, text, label, danger]] of Object.entries(ACTIONS)) {
    actions[verb].addEventListener("click", async () => {
      if (!(await confirmAction(t, text, label, danger))) return;
      actionError.hidden = true;
      try {
        st.job = await call(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/${verb}`, { method: "POST" });
        renderJob();
      } catch (e) {
        actionError.textContent = `Cannot ${verb}: ${e.message}`;
        actionError.hidden = false;
      }
    });
  }

  // ---- data
  async function loadJob() {
    try {
      st.job = await call(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`, { signal: abort.signal });
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) showNotFound(e);
      throw e;
    }
    renderJob();
  }

  function showNotFound(e) {
    if (st.notFound) return;
    st.notFound = true;
    stops.forEach((f) => f());
    if (stream) stream.close();
    clear(main).appendChild(el("div.panel", { id: "job-missing" },
      el("h1", "Job not found"),
      el("p", e.message, " It may belong to another project."),
      el("a", { href: "#/jobs" }, "← Back to jobs")));
  }

  // Polls until one read that started after the job was known to be final: a worker posts its
  // last points before it completes, so that read has them all.
  async function loadMetrics() {
    if (st.finalMetrics) return;
    const final = !!st.job && TERMINAL.has(st.job.status);
    await store.refresh(abort.signal);
    if (final) st.finalMetrics = true;
    drawCharts();
  }

  async function loadCheckpoints() {
    const list = await call(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`, { signal: abort.signal });
    renderCheckpoints(list.data || []);
  }

  async function loadArtifacts() {
    const ids = (st.job && st.job.result_files) || [];
    for (const id of ids) {
      if (!st.files.has(id)) {
        try { st.files.set(id, await call(`/v1/files/${encodeURIComponent(id)}`, { signal: abort.signal })); }
        catch (e) { if (e.name === "AbortError") return; st.files.set(id, { id, filename: id, bytes: null }); }
      }
    }
    renderArtifacts(ids);
  }

  function onEvent(ev) {
    st.events.push(ev);
    const s = stageOf(ev);
    if (s >= 0) {
      st.stage = s;
      if (st.stageAt[s] === null) st.stageAt[s] = ev.created_at;
    }
    if (ev.type === "metrics" && ev.data) store.addRow(ev.data);
    scheduleRefresh(ev);
  }

  // Events arrive in bursts (a replay of history, a worker's batch): redraw once per frame, and
  // re-read the job (status) and checkpoints once per burst.
  let frame = 0, burstTimer = 0, sawCheckpoint = false;
  function scheduleRefresh(ev) {
    if (/^Checkpoint /.test(ev.message || "")) sawCheckpoint = true;
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; renderLog(); renderTimeline(); drawCharts(); });
    clearTimeout(burstTimer);
    burstTimer = setTimeout(() => {
      loadJob().catch(() => {});
      if (sawCheckpoint) { sawCheckpoint = false; loadCheckpoints().catch(() => {}); }
    }, 150);
  }

  // ---- rendering
  function renderJob() {
    const j = st.job;
    if (!j) return;
    clear(statusSlot).appendChild(badge(j.status));
    actions.cancel.disabled = TERMINAL.has(j.status);
    actions.pause.disabled = !(j.status === "running" || j.status === "queued");
    actions.resume.disabled = j.status !== "paused";
    actions.pause.hidden = j.status === "paused";
    actions.resume.hidden = j.status !== "paused";
    const sum = store.summary(j);
    const a = j.adapter || {};
    kv(overview, [
      ["Status", badge(j.status)],
      ["Model", j.model],
      ["Method", a.type ? `${a.type}${a.type !== "full" ? `, rank ${a.rank}` : ""}` : "—"],
      ["Progress", progressCell(sum.progress)],
      ["Tokens/s", fmtRate(sum.tokensPerS)],
      ["ETA", j.status === "running" ? fmtDuration(sum.etaS) : "—"],
      ["Created", fmtTime(j.created_at)],
      ["Started", fmtTime(j.started_at)],
      ["Finished", fmtTime(j.finished_at)],
      ["Trained tokens", j.trained_tokens ?? "—"],
      ["Attempts", j.attempts ?? "—"],
      ["Fine-tuned model", j.fine_tuned_model ? el("code", j.fine_tuned_model) : "—"],
      j.error && ["Error", el("span", { style: "color:var(--danger)" },
        `${j.error.code ? `${j.error.code}: ` : ""}${j.error.message || ""}`)],
    ]);
    renderSpec(j);
    renderPlacement(j);
    renderTimeline();
    loadArtifacts().catch(() => {});
  }

  function renderSpec(j) {
    const hp = j.hyperparameters || {};
    const a = j.adapter || {};
    const cal = a.calibration || {};
    const r = j.resources || {};
    const rows = [
      ["Training file", j.training_file ? el("code", j.training_file) : "—"],
      ["Validation file", j.validation_file ? el("code", j.validation_file) : "—"],
      ["Calibration file", cal.file ? el("code", cal.file) : "the training file"],
      ["Calibration", cal.samples ? `${cal.samples} samples × ${cal.max_length} tokens` : "—"],
      ["Adapter", a.type || "—"],
      ["Rank / alpha", a.type === "full" ? "—" : `${a.rank ?? "—"} / ${a.alpha ?? "—"}`],
      ["Target modules", (a.target_modules || []).join(", ") || "—"],
      ...Object.entries(hp).map(([k, v]) => [k, typeof v === "number" ? fmtNum(v, 6) : String(v)]),
      ["Seed", j.seed ?? "—"],
      ["Suffix", j.user_provided_suffix || "—"],
      ["Metadata", j.metadata && Object.keys(j.metadata).length
        ? el("span.wrap", Object.entries(j.metadata).map(([k, v], i) => [i ? ", " : "", el("code", `${k}=${v}`)])) : "—"],
      ["Resources", `${r.ranks ?? 1} rank${(r.ranks ?? 1) > 1 ? "s" : ""}, device ${r.device ?? "any"}`],
    ];
    kv(specTable, rows);
  }

  // Where the job runs (GET job's placement: rank → worker) while it runs; while it is queued, why
  // it waits: the scheduler's newest reservation event since the last lease ("Waiting for N devices
  // at once …" when free devices are held for it, "Cannot be placed yet …" when the live workers
  // are too few for its ranks).
  function renderPlacement(j) {
    clear(placement);
    const p = j.placement;
    const ranks = (j.resources && j.resources.ranks) || 1;
    if (j.status === "running" && p && p.ranks) {
      const workers = new Set(p.ranks.map((r) => r.worker_id));
      placement.appendChild(el("p.muted", { id: "placement-summary" },
        `${p.world_size} rank${p.world_size > 1 ? "s" : ""} on ${workers.size} worker${workers.size > 1 ? "s" : ""}`,
        ` · lease generation ${p.lease_generation}`));
      placement.appendChild(el("table", { id: "placement-table" },
        el("thead", el("tr", el("th", "Rank"), el("th", "Worker"))),
        el("tbody", p.ranks.map((r) => el("tr", { "data-rank": r.rank, "data-worker-id": r.worker_id },
          el("td", r.rank),
          el("td", el("a", { href: "#/workers" }, el("strong", r.worker_name || r.worker_id)), " ",
             el("span.muted.mono", r.worker_id)))))));
      return;
    }
    if (j.status === "queued") {
      const wait = waitReason();
      placement.appendChild(el("div.notice", { id: "wait-reason", "data-reason": wait ? wait.kind : "none", role: "status" },
        wait ? wait.message : `Queued for ${ranks} device${ranks > 1 ? "s" : ""} of a live worker with model ${j.model}.`));
      return;
    }
    placement.appendChild(el("p.muted", { id: "placement-none" },
      TERMINAL.has(j.status) ? "The job no longer runs on any worker." : `Not running (${j.status.replace("_", " ")}).`,
      ` ${ranks} rank${ranks > 1 ? "s" : ""} requested.`));
  }

  function waitReason() {
    for (let i = st.events.length - 1; i >= 0; i--) {
      const m = st.events[i].message || "";
      if (/^Job leased /.test(m)) return null;
      if (/^Waiting for \d+ devices at once/.test(m)) return { kind: "holding", message: m };
      if (/^Cannot be placed yet/.test(m)) return { kind: "capacity", message: m };
    }
    return null;
  }

  function renderTimeline() {
    const j = st.job;
    clear(timeline);
    const status = j ? j.status : "validating_files";
    const ended = status === "failed" || status === "cancelled";
    // The current stage: the last one an event entered; validating while the server checks files.
    const cur = status === "validating_files" ? 0 : st.stage;
    const validated = ["queued", "running", "paused", "succeeded"].includes(status) ||
      st.events.some((e) => /^Files validated/.test(e.message || ""));
    // A stage the worker never announced while it announced a later one was skipped (e.g. no
    // calibration for plain LoRA); without any announcements, earlier stages just count as done.
    const lastSeen = st.stageAt.reduce((m, at, i) => (at !== null ? i : m), -1);
    STAGES.forEach((name, i) => {
      let cls = "";
      if (status === "succeeded" || (cur >= 0 && i < cur)) {
        cls = i > 0 && st.stageAt[i] === null && i < lastSeen ? "skipped" : "done";
      } else if (cur < 0) cls = i === 0 ? (validated ? "done" : ended ? "failed" : "active") : "";
      else if (i === cur) cls = ended ? "failed" : "active";
      const at = i === 0 ? (j ? j.created_at : null) : st.stageAt[i];
      const note = cls === "skipped" ? "skipped" : cls === "active" && status === "paused" ? "paused"
        : cls && at ? fmtTime(at) : "";
      timeline.appendChild(el(`li${cls ? `.${cls}` : ""}`,
        { "data-stage": name, "data-state": cls || "pending", "aria-current": cls === "active" ? "step" : null },
        name, el("span.when", note)));
    });
  }

  function renderLog() {
    clear(logList);
    // Step rows (a metrics event with a step) are hidden unless asked for; summaries stay.
    const shown = st.events.filter((e) => st.showMetricEvents || !isStepRow(e));
    for (const ev of shown.slice(-MAX_LOG).reverse()) {
      logList.appendChild(el("li", { "data-event-id": ev.id },
        el("span.t", fmtTime(ev.created_at).slice(11)),
        el(`span.msg.lvl-${ev.level}`, ev.message)));
    }
    if (!shown.length) logList.appendChild(el("li.muted", "No events yet."));
  }

  function drawCharts() {
    if (store.version === st.drawnVersion) return;
    st.drawnVersion = store.version;
    lossChart.set([store.points(M.trainLoss), store.points(M.validLoss)]);
    lrChart.set([store.points(M.lr)]);
    const layers = store.driftLayers();
    let mean = store.points(M.driftMean);
    if (!mean.length && layers.length) {
      // No mean posted: average the layers at each step where every layer was measured.
      const steps = new Map();
      for (const l of layers) for (const [s, v] of l.points) {
        const e = steps.get(s) || { sum: 0, n: 0 };
        e.sum += v; e.n++;
        steps.set(s, e);
      }
      mean = [...steps].filter(([, e]) => e.n === layers.length).sort((a, b) => a[0] - b[0]).map(([x, e]) => ({ x, y: e.sum / e.n }));
    }
    driftChart.set([mean, store.points(M.driftMax)]);
    heatmap.set(layers);
    if (st.ckpts && st.ckpts.length) renderCheckpoints(st.ckpts);
    if (st.job) renderJob();
  }

  function renderCheckpoints(list) {
    st.ckptCount = list.length;
    st.ckpts = list;
    clear(ckptBody);
    if (!list.length) {
      ckptBody.appendChild(el("tr", el("td.muted", { colspan: 4 }, "No checkpoints yet.")));
      return;
    }
    for (const c of list) {
      const m = c.metrics || {};
      // The checkpoint's own metrics when the worker sent some, else the training loss of that step.
      const loss = m.train_loss ?? m.loss ?? m.full_valid_loss ?? m.valid_loss ?? store.merged(M.trainLoss)?.get(c.step_number);
      ckptBody.appendChild(el("tr", { "data-step": c.step_number },
        el("td", c.step_number),
        el("td", fmtTime(c.created_at)),
        el("td", loss !== undefined ? fmtNum(loss) : "—"),
        el("td.wrap", (c.files || []).map((f, i) => [i ? ", " : "", fileLink(f, `${f}`)]))));
    }
  }

  function renderArtifacts(ids) {
    clear(artifacts);
    if (!ids.length) {
      artifacts.appendChild(el("li.muted", st.job && st.job.status === "succeeded"
        ? "The job produced no files." : "Artifacts appear here when the job has exported its adapter."));
      return;
    }
    for (const id of ids) {
      const f = st.files.get(id) || { id, filename: id };
      artifacts.appendChild(el("li", fileLink(id, f.filename), " ", el("span.muted", `${fmtBytes(f.bytes)} · `, el("code", id))));
    }
  }

  function fileLink(id, name) {
    const a = el("a", { href: `/v1/files/${encodeURIComponent(id)}/content`, download: name, "data-file-id": id }, name);
    a.addEventListener("click", async (e) => {
      e.preventDefault();
      try { await downloadFile(id, name); } catch (err) {
        actionError.textContent = `Cannot download ${name}: ${err.message}`;
        actionError.hidden = false;
      }
    });
    return a;
  }

  function kv(table, rows) {
    clear(table);
    const body = el("tbody");
    for (const row of rows) if (row) body.appendChild(el("tr", el("th", row[0]), el("td", row[1])));
    table.appendChild(body);
  }

  // ---- start
  renderTimeline();
  renderLog();
  renderCheckpoints([]);
  loadJob().then(() => {
    if (st.notFound) return;
    stream = streamJobEvents(jobId, {
      onEvent,
      onDone: () => { live.textContent = "final"; loadJob().catch(() => {}); loadMetrics().catch(() => {}); },
      onState: (s) => { live.textContent = s === "live" ? "● live" : "reconnecting…"; },
      onError: (e) => { if (e.status === 404) showNotFound(e); },
    });
    stops.push(every(METRICS_MS, loadMetrics));
    stops.push(every(JOB_MS, async () => { await loadJob(); if (st.ckptCount < 0 || !TERMINAL.has(st.job.status)) await loadCheckpoints(); }));
  }).catch(() => {});

  const scheme = matchMedia("(prefers-color-scheme: dark)");
  const retheme = () => { lossChart.applyTheme(); lrChart.applyTheme(); driftChart.applyTheme(); heatmap.draw(); };
  scheme.addEventListener("change", retheme);

  return () => {
    abort.abort();
    stops.forEach((f) => f());
    if (stream) stream.close();
    cancelAnimationFrame(frame);
    clearTimeout(burstTimer);
    scheme.removeEventListener("change", retheme);
    lossChart.destroy(); lrChart.destroy(); driftChart.destroy();
  };
}
