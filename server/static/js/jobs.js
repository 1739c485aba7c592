// jobs.js — the Jobs page: the project's jobs newest first, filtered by status and by a metadata
// key=value (the API's ?status= and ?metadata[key]=value), paged with the API's cursors
// (?after=<last id of the page>), refreshed every 2 s without a reload. Progress, tokens/s and ETA
// come from each running job's metrics (metrics.js).
// Hash: #/jobs?status=<status>&metadata[<key>]=<value>&limit=<n> (the filters live in the URL).
import { call } from "./api.js";
import { MetricStore, M } from "./metrics.js";
import { el, clear, badge, fmtTime, fmtDuration, fmtRate, STATUSES, every } from "./util.js";

const POLL_MS = 2000;
const COLUMNS = ["ID", "Model", "Method", "Status", "Progress", "Tokens/s", "ETA", "Created"];

export function render(main, [query]) {
  const params = new URLSearchParams(query || "");
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const limit = Math.min(100, Math.max(1, parseInt(params.get("limit"), 10) || 20));
  // [[key, value]…] from metadata[key]=value; the API matches every pair.
  const meta = [...params].map(([k, v]) => [/^metadata\[(.+)\]$/.exec(k), v]).filter(([m]) => m).map(([m, v]) => [m[1], v]);
  // cursors[i] is the `after` of page i (null: the newest page).
  const state = { cursors: [null], page: 0, seq: 0, stores: new Map(), abort: new AbortController() };

  const filter = el("select", { id: "status-filter", "aria-label": "Filter by status" },
    el("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => el("option", { value: s, selected: s === status }, s.replace("_", " "))));
  const metaInput = el("input", { id: "metadata-filter", type: "search", placeholder: "metadata key=value",
                                  "aria-label": "Filter by metadata (key=value)", "aria-describedby": "metadata-filter-error",
                                  value: meta.map(([k, v]) => `${k}=${v}`).join(" & ") });
  const metaError = el("span.form-error", { id: "metadata-filter-error", role: "alert" });
  const metaForm = el("form.inline", { id: "metadata-form", novalidate: true }, metaInput, metaError);
  // The filters go to the URL; the hash change renders the page again with them.
  function navigate(pairs) {
    const p = new URLSearchParams();
    if (filter.value) p.set("status", filter.value);
    for (const [k, v] of pairs) p.append(`metadata[${k}]`, v);
    if (limit !== 20) p.set("limit", limit);
    location.hash = p.toString() ? `#/jobs?${p}` : "#/jobs";
  }
  filter.addEventListener("change", () => navigate(meta));
  metaForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const pairs = parseMeta(metaInput.value);
    if (typeof pairs === "string") { metaError.textContent = pairs; return; }
    metaError.textContent = "";
    navigate(pairs);
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
      metaForm,
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
    for (const [k, v] of meta) q.append(`metadata[${k}]`, v);
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
      const what = `${status ? `${status.replace("_", " ")} ` : ""}jobs`;
      tbody.appendChild(el("tr", el("td.muted", { colspan: 8 },
        meta.length ? `No ${what} with metadata ${meta.map(([k, v]) => `${k}=${v}`).join(" & ")}.`
          : status ? `No ${what}.` : "No jobs yet. ",
        !status && !meta.length && el("a", { href: "#/new" }, "Create one."))));
      return;
    }
    for (const j of jobs) {
      const store = state.stores.get(j.id);
      const sum = store ? store.summary(j) : { progress: j.status === "succeeded" ? 1 : null, tokensPerS: null, etaS: null };
      const adapter = j.adapter || {};
      const method = adapter.type ? `${adapter.type}${adapter.type !== "full" && adapter.rank ? ` r${adapter.rank}` : ""}` : (j.method?.type || "—");
      const cells = [
        el("span", el("a.mono", { href: `#/jobs/${j.id}` }, j.id), metaTags(j.metadata)), j.model, method, badge(j.status), progressCell(sum.progress),
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

// "k=v & k2=v2" → [[k, v], [k2, v2]], or a sentence saying what is wrong (the API's limits: keys
// 1..64 characters, values at most 512, at most 16 pairs). "" clears the filter.
function parseMeta(text) {
  const pairs = [];
  for (const part of text.split("&").map((x) => x.trim()).filter(Boolean)) {
    const eq = part.indexOf("=");
    if (eq < 1) return `"${part}" is not key=value.`;
    const k = part.slice(0, eq).trim(), v = part.slice(eq + 1).trim();
    if (k.length > 64 || /[\[\]]/.test(k)) return `The key "${k.slice(0, 20)}" must be 1..64 characters without brackets.`;
    if (v.length > 512) return `The value of ${k} is longer than 512 characters.`;
    pairs.push([k, v]);
  }
  return pairs.length > 16 ? "At most 16 key=value pairs." : pairs;
}

function metaTags(m) {
  const entries = Object.entries(m || {});
  return entries.length ? el("div.muted.meta", entries.map(([k, v], i) => [i ? " · " : "", `${k}=${v}`])) : null;
}

export function progressCell(p) {
  if (p === null || p === undefined) return el("span.muted", "—");
  const pct = Math.round(p * 100);
  return el("span.progress", { "data-progress": pct },
    el("span.bar", el("span", { style: `width:${pct}%` })), `${pct}%`);
}
