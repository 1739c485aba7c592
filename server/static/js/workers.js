// workers.js — the Workers page: every registered worker with its devices, memory, models, last
// heartbeat, current jobs with the ranks of each that it runs (a gang's ranks may be spread over
// several workers), and whether it is alive or lost (no heartbeat within the server's worker
// timeout). Reads GET /v1/workers; refreshed every 3 s.
import { call, ApiError } from "./api.js";
import { el, clear, badge, fmtAgo, fmtBytes, every } from "./util.js";

const COLUMNS = ["Worker", "Status", "Devices", "Memory", "Models", "Last heartbeat", "Current jobs and ranks"];

export function render(main) {
  const abort = new AbortController();
  const tbody = el("tbody");
  const notice = el("div.notice", { role: "status", hidden: true });
  const summary = el("span.muted", { id: "workers-summary" });
  main.appendChild(el("section",
    el("div.toolbar", el("h1", { style: "margin:0" }, "Workers"), el("span.spacer"), summary),
    notice,
    el("div.panel.scroll-x",
      el("table.cards", { id: "workers-table" },
        el("thead", el("tr", COLUMNS.map((c) => el("th", c)))),
        tbody))));

  let stop = null;
  async function load() {
    let list;
    try {
      list = await call("/v1/workers", { signal: abort.signal });
      notice.hidden = true;
    } catch (e) {
      if (e.name === "AbortError") return;
      notice.className = "notice error";
      notice.textContent = e instanceof ApiError && e.status === 404
        ? "This server does not list workers (GET /v1/workers is not available)."
        : `Cannot list workers: ${e.message}`;
      notice.hidden = false;
      if (e.status === 404 && stop) stop();
      return;
    }
    const workers = list.data || [];
    const alive = workers.filter((w) => w.status === "alive").length;
    summary.textContent = `${alive} alive · ${workers.length - alive} lost`;
    clear(tbody);
    if (!workers.length) {
      tbody.appendChild(el("tr", el("td.muted", { colspan: 7 }, "No worker has registered yet. Start one with ",
        el("code", "loranull-worker --server URL --token-file F --models DIR"), ".")));
      return;
    }
    for (const w of workers) {
      // ranks: [{job_id, world_size, ranks}] (servers before it: current_jobs only).
      const jobs = w.ranks || (w.current_jobs || []).map((id) => ({ job_id: id }));
      const cells = [
        el("span", el("strong", w.name), el("div.muted.mono", w.id)),
        badge(w.status || "alive"),
        `${w.devices} × ${w.device_kind}`,
        w.memory_bytes ? fmtBytes(w.memory_bytes) : "—",
        (w.models || []).join(", ") || "—",
        el("span", { title: w.last_heartbeat_at ? new Date(w.last_heartbeat_at * 1000).toISOString() : "" },
           fmtAgo(w.last_heartbeat_at)),
        jobs.length ? el("div.worker-jobs", jobs.map((j) => el("div", { "data-job-id": j.job_id },
          el("a.mono", { href: `#/jobs/${j.job_id}` }, j.job_id),
          j.ranks && el("span.ranks", { "data-ranks": j.ranks.join(",") },
            ` · rank${j.ranks.length > 1 ? "s" : ""} ${j.ranks.join(", ")} of ${j.world_size}`))))
          : w.busy ? "busy (another project)" : el("span.muted", "idle"),
      ];
      tbody.appendChild(el("tr", { "data-worker-id": w.id },
        cells.map((c, i) => el(i === 4 ? "td.wrap" : "td", { "data-label": COLUMNS[i] }, c))));
    }
  }
  stop = every(3000, load);
  return () => { stop(); abort.abort(); };
}
