// newjob.js — the New job page: upload the training / validation / calibration files (or pick
// files uploaded before), pick a base model that live workers hold (GET /v1/models) and a method,
// set the rank and the common hyperparameters, and POST /v1/fine_tuning/jobs.
//
// Validation is the API's: the form sends what the user typed (numbers as numbers, anything else
// as text) and shows the error's message next to the field its `param` names ("adapter.rank"),
// or above the form when no field matches. Empty fields are left out, so the server's defaults apply.
import { call, uploadFile, ApiError } from "./api.js";
import { el, clear, fmtBytes, every } from "./util.js";

const METHODS = [
  ["lora_null_v2", "LoRA-Null v2 — null-space init, B trained (keeps knowledge best)"],
  ["lora_null_v1", "LoRA-Null v1 — null-space init, A and B trained"],
  ["lora", "LoRA"],
  ["pissa", "PiSSA"],
  ["milora", "MiLoRA"],
  ["corda", "CorDA (knowledge-preserved)"],
  ["lora_fa", "LoRA-FA (A frozen)"],
  ["full", "Full fine-tuning"],
];
const TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
// [param, label, placeholder (the server's default), hint]
const HPARAMS = [
  ["hyperparameters.n_epochs", "Epochs", "3"],
  ["hyperparameters.batch_size", "Batch size", "8"],
  ["hyperparameters.learning_rate", "Learning rate", "2e-4", "or a multiplier below, not both"],
  ["hyperparameters.learning_rate_multiplier", "Learning-rate multiplier", "1"],
  ["hyperparameters.warmup_ratio", "Warmup ratio", "0.03"],
  ["hyperparameters.max_seq_len", "Max sequence length", "2048"],
  ["hyperparameters.grad_accum", "Gradient accumulation", "1"],
  ["hyperparameters.weight_decay", "Weight decay", "0"],
  ["hyperparameters.max_grad_norm", "Max grad norm", "1.0", "0 = no clipping"],
  ["hyperparameters.eval_interval", "Eval every (steps)", "0", "0 = at the end"],
  ["hyperparameters.save_interval", "Checkpoint every (steps)", "0", "0 = at the end"],
];

export function render(main) {
  const abort = new AbortController();
  const fields = new Map(); // param → {wrap, error}
  const uploaded = new WeakMap(); // File → file id, so a resubmit does not upload again

  function field(param, label, control, hint) {
    const id = `f-${param.replace(/[^a-z0-9_]+/gi, "-")}`;
    if (control.tagName !== "DIV") control.id = id;
    const error = el("div.error", { id: `${id}-error`, role: "alert" });
    if (control.setAttribute) control.setAttribute("aria-describedby", `${id}-error`);
    const wrap = el("div.field", { "data-param": param },
      el(control.tagName === "DIV" ? "span.label" : "label", control.tagName === "DIV" ? {} : { for: id }, label),
      control, hint && el("div.hint", hint), error);
    fields.set(param, { wrap, error });
    return wrap;
  }
  const text = (placeholder, attrs = {}) => el("input", { type: "text", inputmode: "decimal", placeholder, ...attrs });

  // ---- files
  function fileField(param, label, required, hint) {
    const input = el("input", { type: "file", accept: ".jsonl,.json,.txt,application/jsonl", "aria-label": label });
    const existing = el("select", { "aria-label": `${label}: a file uploaded before` },
      el("option", { value: "" }, required ? "— or pick an uploaded file —" : "— none, or pick an uploaded file —"));
    const box = el("div", input, existing);
    const w = field(param, label, box, hint);
    input.id = `f-${param.replace(/[^a-z0-9_]+/gi, "-")}`;
    return { w, input, existing, required };
  }
  const files = {
    training: fileField("training_file", "Training data (JSONL)", true,
                        "One example a line: {\"messages\": […]}, {\"prompt\", \"completion\"}, {\"text\"} or {\"input_ids\"}."),
    validation: fileField("validation_file", "Validation data", false, "Optional; its loss is charted."),
    calibration: fileField("adapter.calibration.file", "Calibration (knowledge) data", false,
                           "Text whose knowledge the adapter must keep; default: the training file."),
  };

  // ---- model and method
  const model = el("select", { name: "model" });
  const modelHint = el("span");
  const method = el("select", { name: "adapter.type" }, METHODS.map(([v, l]) => el("option", { value: v }, l)));
  const rank = text("8", { inputmode: "numeric" });
  const alpha = text("= rank");
  const targets = el("div.checks", TARGETS.map((t) => el("label", el("input", { type: "checkbox", value: t, checked: true }), t)));
  const calSamples = text("256", { inputmode: "numeric" });
  const calLen = text("1024", { inputmode: "numeric" });
  const hp = HPARAMS.map(([param, label, ph, hint]) => ({ param, input: text(ph), label, hint }));
  const seed = text("random", { inputmode: "numeric" });
  const suffix = el("input", { type: "text", placeholder: "my-run", maxlength: 64 });
  const ranks = text("1", { inputmode: "numeric" });
  const device = el("select", ["any", "cpu", "cuda"].map((d) => el("option", { value: d }, d)));
  const formError = el("div.form-error", { id: "form-error", role: "alert" });
  const submit = el("button", { type: "submit", id: "submit-job" }, "Create job");
  const progress = el("span.muted", { id: "submit-progress" });

  const form = el("form", { id: "new-job", novalidate: true },
    el("h1", "New fine-tuning job"),
    el("fieldset", el("legend", "Data"), files.training.w, files.validation.w, files.calibration.w),
    el("fieldset", el("legend", "Model and method"),
      el("div.fields",
        field("model", "Base model", model, modelHint),
        field("adapter.type", "Method", method),
        field("adapter.rank", "Rank", rank),
        field("adapter.alpha", "Alpha", alpha, "scale = alpha / rank")),
      field("adapter.target_modules", "Target modules", targets),
      el("div.fields",
        field("adapter.calibration.samples", "Calibration samples", calSamples),
        field("adapter.calibration.max_length", "Calibration max tokens", calLen))),
    el("fieldset", el("legend", "Hyperparameters"),
      el("div.fields", hp.map((h) => field(h.param, h.label, h.input, h.hint)))),
    el("fieldset", el("legend", "Run"),
      el("div.fields",
        field("seed", "Seed", seed),
        field("suffix", "Model name suffix", suffix),
        field("resources.ranks", "Ranks (devices)", ranks, "tensor-parallel ranks"),
        field("resources.device", "Device", device))),
    formError,
    el("div.toolbar", submit, progress));
  main.appendChild(el("section.panel", form));

  method.addEventListener("change", () => {
    const full = method.value === "full";
    rank.disabled = alpha.disabled = full;
    for (const c of targets.querySelectorAll("input")) c.disabled = full;
  });

  // ---- choices from the server
  // Base models are the ones live workers hold ("workers" > 0). They are re-read every 5 s, so a
  // worker that starts while the form is open shows up; the user's choice is kept.
  let modelKey = null;
  async function loadModels() {
    const models = await call("/v1/models", { signal: abort.signal });
    const bases = (models.data || []).filter((m) => m.workers > 0);
    const key = JSON.stringify(bases.map((m) => [m.id, m.workers]));
    if (key === modelKey) return;
    modelKey = key;
    const chosen = model.value;
    clear(model);
    if (!bases.length) {
      model.appendChild(el("option", { value: "" }, "no live worker holds a model"));
      modelHint.textContent = "Start a worker with --models DIR; its models appear here.";
      return;
    }
    for (const m of bases)
      model.appendChild(el("option", { value: m.id, selected: m.id === chosen },
                           `${m.id} (${m.workers} worker${m.workers > 1 ? "s" : ""})`));
    modelHint.textContent = "";
  }
  const stopModels = every(5000, async () => {
    try { await loadModels(); } catch (e) {
      if (e.name !== "AbortError") formError.textContent = `Cannot load the models: ${e.message}`;
    }
  });
  (async () => {
    try {
      const fileList = await call("/v1/files?purpose=fine-tune&limit=100", { signal: abort.signal });
      for (const f of Object.values(files))
        for (const x of fileList.data || [])
          f.existing.appendChild(el("option", { value: x.id }, `${x.filename} · ${fmtBytes(x.bytes)} · ${x.id}`));
    } catch (e) {
      if (e.name !== "AbortError") formError.textContent = `Cannot list uploaded files: ${e.message}`;
    }
  })();

  // ---- submit
  function clearErrors() {
    formError.textContent = "";
    for (const f of fields.values()) { f.error.textContent = ""; f.wrap.classList.remove("invalid"); }
  }

  function showError(e) {
    // "adapter.calibration.samples" → that field; "hyperparameters.x" from a method's hyperparameters too.
    let param = e.param || "";
    param = param.replace(/^method\.supervised\./, "");
    let f = fields.get(param);
    for (let p = param; !f && p.includes("."); p = p.slice(0, p.lastIndexOf("."))) f = fields.get(p);
    if (f) {
      f.error.textContent = e.message;
      f.wrap.classList.add("invalid");
      f.wrap.scrollIntoView({ block: "center" });
    } else {
      formError.textContent = e.message;
    }
  }

  // Text → number when it reads as one; anything else goes as typed for the server to judge.
  function value(input) {
    const v = input.value.trim();
    if (v === "") return undefined;
    if (v === "auto") return v;
    return /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(v) ? Number(v) : v;
  }

  function setPath(obj, path, v) {
    if (v === undefined) return;
    const parts = path.split(".");
    let o = obj;
    for (const p of parts.slice(0, -1)) o = o[p] ??= {};
    o[parts[parts.length - 1]] = v;
  }

  async function fileId(f, param) {
    const file = f.input.files[0];
    if (!file) return f.existing.value || undefined;
    if (uploaded.has(file)) return uploaded.get(file);
    progress.textContent = `Uploading ${file.name} (${fmtBytes(file.size)})…`;
    try {
      const obj = await uploadFile(file);
      uploaded.set(file, obj.id);
      return obj.id;
    } catch (e) {
      throw new ApiError(e.status, { message: `${file.name}: ${e.message}`, param });
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    submit.disabled = true;
    try {
      const body = {};
      const training = await fileId(files.training, "training_file");
      if (!training) throw new ApiError(400, { message: "Choose a training file.", param: "training_file" });
      body.training_file = training;
      setPath(body, "validation_file", await fileId(files.validation, "validation_file"));
      setPath(body, "adapter.calibration.file", await fileId(files.calibration, "adapter.calibration.file"));
      if (!model.value) throw new ApiError(400, { message: "No model to train: no live worker holds one.", param: "model" });
      body.model = model.value;
      setPath(body, "adapter.type", method.value);
      if (method.value !== "full") {
        setPath(body, "adapter.rank", value(rank));
        setPath(body, "adapter.alpha", value(alpha));
        const chosen = [...targets.querySelectorAll("input:checked")].map((c) => c.value);
        if (chosen.length !== TARGETS.length) body.adapter.target_modules = chosen;
      }
      setPath(body, "adapter.calibration.samples", value(calSamples));
      setPath(body, "adapter.calibration.max_length", value(calLen));
      for (const h of hp) setPath(body, h.param, value(h.input));
      setPath(body, "seed", value(seed));
      setPath(body, "suffix", suffix.value.trim() || undefined);
      setPath(body, "resources.ranks", value(ranks));
      if (device.value !== "any") setPath(body, "resources.device", device.value);
      progress.textContent = "Creating the job…";
      const job = await call("/v1/fine_tuning/jobs", { json: body, signal: abort.signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      if (e.name === "AbortError") return;
      progress.textContent = "";
      if (e instanceof ApiError) showError(e);
      else formError.textContent = e.message;
    } finally {
      submit.disabled = false;
    }
  });

  return () => { stopModels(); abort.abort(); };
}
