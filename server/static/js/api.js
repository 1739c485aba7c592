// api.js — the dashboard's only door to loranull-server: the API key of this tab, JSON calls with
// OpenAI-shaped errors, file uploads and downloads, and job event streams (SSE).
//
// The key lives in sessionStorage: it survives reloads of this tab and is gone when the tab closes.
// Every call sends it as "Authorization: Bearer <key>". Because EventSource cannot send headers, the
// event stream is read with fetch() and parsed here (text/event-stream: "id:"/"data:" lines, blank
// line ends an event), resuming with Last-Event-ID after a dropped connection.

const KEY_NAME = "loranull.apiKey";

export function apiKey() { return sessionStorage.getItem(KEY_NAME); }
export function setApiKey(key) { sessionStorage.setItem(KEY_NAME, key); }
export function clearApiKey() { sessionStorage.removeItem(KEY_NAME); }

// An error the API returned ({"error": {message, type, param, code}}) or a network failure
// (status 0). `param` names the request field at fault, e.g. "adapter.rank".
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

function authHeaders(key) {
  const k = key ?? apiKey();
  return k ? { Authorization: `Bearer ${k}` } : {};
}

async function errorOf(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: fall through */ }
  const err = body && body.error && typeof body.error === "object" ? body.error
    : { message: `${res.status} ${res.statusText || "error"} from ${new URL(res.url).pathname}` };
  return new ApiError(res.status, err);
}

// One JSON call. opts: {method, json (a body to send as JSON), form (FormData), key (override the
// stored key, for sign-in), signal}. Resolves to the parsed body; rejects with ApiError. A 401 with
// the stored key means the key was revoked: the app listens for "ln-unauthorized" and signs out.
export async function call(path, opts = {}) {
  const headers = authHeaders(opts.key);
  let body;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  } else if (opts.form) {
    body = opts.form;
  }
  let res;
  try {
    res = await fetch(path, { method: opts.method || (body ? "POST" : "GET"), headers, body, signal: opts.signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { message: `The server cannot be reached (${e.message}).` });
  }
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401 && opts.key === undefined) window.dispatchEvent(new CustomEvent("ln-unauthorized"));
    throw err;
  }
  if (res.status === 204) return null;
  return res.json();
}

// Uploads one file for fine-tuning; resolves to the file object.
export function uploadFile(file, purpose = "fine-tune") {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  return call("/v1/files", { form });
}

// Downloads a file's content with the key (a plain link cannot carry the Authorization header)
// and hands it to the browser as a saved file.
export async function downloadFile(fileId, filename) {
  let res;
  try {
    res = await fetch(`/v1/files/${encodeURIComponent(fileId)}/content`, { headers: authHeaders() });
  } catch (e) {
    throw new ApiError(0, { message: `The server cannot be reached (${e.message}).` });
  }
  if (!res.ok) throw await errorOf(res);
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename || fileId;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// A connection that stays silent this long is dead even if TCP did not say so: the server writes a
// keep-alive comment every --sse-keepalive-s (15 s by default).
const SSE_SILENCE_MS = 45000;

// Follows GET /v1/fine_tuning/jobs/{id}/events?stream=true from the first event.
// handlers: onEvent(event) for every event in order, onDone() at "[DONE]" (the job is final),
// onState("live" | "reconnecting") for the connection indicator. Returns {close()}.
export function streamJobEvents(jobId, handlers) {
  const ctl = { closed: false, abort: null, lastId: null, timer: null, heard: 0, watchdog: null, stale: false };
  const state = (s) => handlers.onState && handlers.onState(s);

  async function connect() {
    if (ctl.closed) return;
    const abort = new AbortController();
    ctl.abort = abort;
    ctl.stale = false;
    ctl.heard = Date.now();
    clearInterval(ctl.watchdog);
    ctl.watchdog = setInterval(() => {
      if (Date.now() - ctl.heard > SSE_SILENCE_MS) { ctl.stale = true; abort.abort(); }
    }, 5000);
    const headers = { ...authHeaders(), Accept: "text/event-stream" };
    if (ctl.lastId) headers["Last-Event-ID"] = ctl.lastId;
    let done = false;
    try {
      const res = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`,
                              { headers, signal: abort.signal, cache: "no-store" });
      if (!res.ok) {
        const err = await errorOf(res);
        if (handlers.onError) handlers.onError(err);
        // 4xx will not get better by retrying (unknown job, revoked key).
        if (res.status >= 400 && res.status < 500) return;
        throw err;
      }
      state("live");
      done = await readStream(res.body.getReader());
    } catch (e) {
      if (ctl.closed || (e.name === "AbortError" && !ctl.stale)) return;
    } finally {
      clearInterval(ctl.watchdog);
    }
    if (done) {
      if (handlers.onDone) handlers.onDone();
      return;
    }
    if (!ctl.closed) {
      state("reconnecting");
      ctl.timer = setTimeout(connect, 1000);
    }
  }

  // Reads events until the stream ends; true when it ended with [DONE].
  async function readStream(reader) {
    const decoder = new TextDecoder();
    let buf = "", id = null, data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      ctl.heard = Date.now();
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        let line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) {
            const payload = data.join("\n");
            data = [];
            if (payload === "[DONE]") return true;
            if (id) ctl.lastId = id;
            let ev = null;
            try { ev = JSON.parse(payload); } catch { /* a malformed event is skipped, not fatal */ }
            if (ev && handlers.onEvent) handlers.onEvent(ev);
          }
          id = null;
        } else if (line.startsWith(":")) {
          // keep-alive comment
        } else if (line.startsWith("id:")) {
          id = line.slice(3).trim();
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  }

  connect();
  return {
    close() {
      ctl.closed = true;
      clearTimeout(ctl.timer);
      clearInterval(ctl.watchdog);
      if (ctl.abort) ctl.abort.abort();
    },
  };
}
