// app.js — sign-in, navigation and the hash router (#/jobs, #/jobs/<id>, #/new, #/workers).
// The server serves only "/" and /static/…, so pages live after the "#".
// Each page module exports render(main, params) → a cleanup function that stops its timers and
// streams; the router calls it before the next page renders.
import { apiKey, setApiKey, clearApiKey, call, ApiError } from "./api.js";
import { el, clear } from "./util.js";
import * as jobsPage from "./jobs.js";
import * as jobPage from "./job.js";
import * as newJobPage from "./newjob.js";
import * as workersPage from "./workers.js";

const main = document.getElementById("main");
let cleanup = null;

const routes = [
  { re: /^#\/jobs\/([A-Za-z0-9_-]+)$/, page: jobPage, nav: "jobs" },
  { re: /^#\/jobs(?:\?(.*))?$/, page: jobsPage, nav: "jobs" },
  { re: /^#\/new$/, page: newJobPage, nav: "new" },
  { re: /^#\/workers$/, page: workersPage, nav: "workers" },
];

function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  clear(main);
  const signedIn = !!apiKey();
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("session").hidden = !signedIn;
  if (!signedIn) {
    renderSignIn();
    return;
  }
  const key = apiKey();
  document.getElementById("session-key").textContent = `key ${key.slice(0, 10)}…`;
  const hash = location.hash || "#/jobs";
  for (const r of routes) {
    const m = r.re.exec(hash);
    if (!m) continue;
    for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === r.nav);
    cleanup = r.page.render(main, m.slice(1)) || null;
    return;
  }
  location.replace("#/jobs");
}

function renderSignIn() {
  const input = el("input", { id: "api-key", type: "password", autocomplete: "off", required: true,
                                   placeholder: "sk-ln-…", "aria-describedby": "signin-error" });
  const error = el("div.form-error", { id: "signin-error", role: "alert" });
  const button = el("button", { type: "submit" }, "Sign in");
  const form = el("form.panel.signin", { id: "signin", novalidate: true },
    el("h1", "Sign in"),
    el("p.muted", "Paste an API key of your project (",
       el("code", "loranull-server keys create --project NAME"), "). It is kept only in this browser tab."),
    el("div.field", el("label", { for: "api-key" }, "API key"), input),
    error,
    el("div.toolbar", button));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    error.textContent = "";
    if (!key) { error.textContent = "Enter an API key."; return; }
    button.disabled = true;
    try {
      // Any authenticated call proves the key; the job list is the first page anyway.
      await call("/v1/fine_tuning/jobs?limit=1", { key });
      setApiKey(key);
      // A new hash routes through hashchange; the same hash (a deep link) routes here.
      if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
      else route();
    } catch (e) {
      error.textContent = e instanceof ApiError && e.status === 401
        ? `This key was refused: ${e.message}` : `Cannot sign in: ${e.message}`;
    } finally {
      button.disabled = false;
    }
  });
  main.appendChild(form);
  input.focus();
}

document.getElementById("sign-out").addEventListener("click", () => {
  clearApiKey();
  route();
});

// A call answered 401 with the stored key: it was revoked (or the server's data was reset).
window.addEventListener("ln-unauthorized", () => {
  if (!apiKey()) return;
  clearApiKey();
  route();
  const err = document.getElementById("signin-error");
  if (err) err.textContent = "Your API key is no longer accepted; sign in again.";
});

window.addEventListener("hashchange", route);
route();
