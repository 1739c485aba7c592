// jobs.js — the Jobs page: the project's jobs newest first, filtered by status, paged with the API's
// cursors (?after=<last id of the page>), refreshed every 2 s without a reload. Progress, tokens/s
// and ETA come from each running job's metrics (metrics.js).
// Hash: #/jobs?status=<status>&limit=<n>.
import { call } from "./api.js";
import { MetricStore, M } from "./metrics.js";
import { el, clear, badge, fmtTime, fmtDuration, fmtRate, STATUSES, every } from "./util.js";

const POLL_MS = 2000;
const COLUMNS = ["ID", "Model", "Method", "Status", "Progress", "Tokens/s", "ETA", "Created"];

export function render(main, [query]) {
  const params = new URLSearchParams(query || "");
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const limit = Math.min(100, Math.max(1, parseInt(params.get("limit"), 10) || 20));
  // cursors[i] is the `after` of page i (null: the newest page).
  const state = { cursors: [null], page: 0, seq: 0, stores: new Map(), abort: new AbortController() };

  const filter = el("select", { id: "status-filter", "aria-label": "Filter by status" },
    el("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => el("option", { value: s, selected: s === status }, s.replace("_", " "))));
  filter.addEventListener("change", () => {
    const p = new URLSearchParams();
    if (filter.value) p.set("status", filter.value);
    if (limit !== 20) p.set("limit", limit);
    location.hash = p.toString() ? `#/jobs?${p}` : "#/jobs";
  });
  const tbody = el("tbody");
  const newer = el("button.secondary", { type: "button", id: "page-newer" }, "← Newer");
  const older = el("button.secondary", { type: "button", id: "page-older" }, "Older →");
  const pageLabel = el("span.muted", { id: "page-label" });
  const error = el("div.notice.error", { role: "alert", hidden: true });

  newer.addEventListener("click", () => { if (state.page > 0) { state.page--; load(); } });
  older.addEventListener("click", () => { state.page++; load(); });

  main.appendChild(el("section",
    el("div.toolbar",
      el("h1", { style: "margin:0" }, "Fine-tuning jobs"),
      el("span.spacer"),
      filter,
      el("a.button", { href: "#/new" }, "New job")),
    error,
    el("div.panel.scroll-x",
      el("table.jobs.cards", { id: "jobs-table" },
        el("thead", el("tr", COLUMNS.map((c) => el("th", c)))),
        tbody)),
    el("div.toolbar", newer, older, pageLabel)));

  async function load() {
    // A click on Older/Newer may overlap a timed refresh: only the latest request may render.
    const seq = ++state.seq;
    const q = new URLSearchParams({ limit });
    const after = state.cursors[state.page];
    if (after) q.set("after", after);
    if (status) q.set("status", status);
    let list;
    try {
      list = await call(`/v1/fine_tuning/jobs?${q}`, { signal: state.abort.signal });
      if (seq !== state.seq) return;
      error.hidden = true;
    } catch (e) {
      if (e.name === "AbortError") return;
      error.textContent = `Cannot list jobs: ${e.message}`;
      error.hidden = false;
      return;
    }
    const jobs = list.data || [];
    // The next page starts after this page's last job; a page that emptied (jobs of another
    // filter moved out) sends the user back to the newest page.
    state.cursors.length = state.page + 1;
    if (list.has_more && jobs.length) state.cursors.push(jobs[jobs.length - 1].id);
    if (!jobs.length && state.page > 0) { state.page = 0; state.cursors = [null]; return load(); }
    await Promise.all(jobs.filter((j) => j.status === "running" || j.status === "paused").map(async (j) => {
      let s = state.stores.get(j.id);
      if (!s) state.stores.set(j.id, (s = new MetricStore(j.id, call)));
      try {
        await s.refresh(state.abort.signal);
        if (!s.latest(M.totalSteps) && !s.latest(M.progress)) await totalFromEvents(j.id, s);
      } catch (e) { if (e.name === "AbortError") throw e; }
    })).catch(() => {});
    if (state.abort.signal.aborted || seq !== state.seq) return;
    renderRows(jobs);
    newer.disabled = state.page === 0;
    older.disabled = !list.has_more;
    pageLabel.textContent = `page ${state.page + 1}`;
  }

  // loranull-worker says the step count in its step events ({step, total_steps, …}), not as a
  // metric point: the newest events give it (once known, it does not change within a run).
  async function totalFromEvents(id, store) {
    const page = await call(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=50`, { signal: state.abort.signal });
    const ev = (page.data || []).find((e) => e.data && Number.isInteger(e.data.step) && e.data.total_steps > 0);
    if (ev) store.add("total_steps", ev.data.step, ev.data.total_steps);
  }

  function renderRows(jobs) {
    clear(tbody);
    if (!jobs.length) {
      tbody.appendChild(el("tr", el("td.muted", { colspan: 8 },
        status ? `No ${status.replace("_", " ")} jobs.` : "No jobs yet. ", !status && el("a", { href: "#/new" }, "Create one."))));
      return;
    }
    for (const j of jobs) {
      const store = state.stores.get(j.id);
      const sum = store ? store.summary(j) : { progress: j.status === "succeeded" ? 1 : null, tokensPerS: null, etaS: null };
      const adapter = j.adapter || {};
      const method = adapter.type ? `${adapter.type}${adapter.type !== "full" && adapter.rank ? ` r${adapter.rank}` : ""}` : (j.method?.type || "—");
      const cells = [
        el("a.mono", { href: `#/jobs/${j.id}` }, j.id), j.model, method, badge(j.status), progressCell(sum.progress),
        fmtRate(sum.tokensPerS), j.status === "running" ? fmtDuration(sum.etaS) : "—",
        el("span", { title: new Date(j.created_at * 1000).toISOString() }, fmtTime(j.created_at)),
      ];
      tbody.appendChild(el("tr", { "data-job-id": j.id },
        cells.map((c, i) => el("td", { "data-label": COLUMNS[i] }, c))));
    }
  }

  const stop = every(POLL_MS, load);
  return () => { stop(); state.abort.abort(); };
}

export function progressCell(p) {
  if (p === null || p === undefined) return el("span.muted", "—");
  const pct = Math.round(p * 100);
  return el("span.progress", { "data-progress": pct },
    el("span.bar", el("span", { style: `width:${pct}%` })), `${pct}%`);
}
