// The nats-cron dashboard: a page over the instance's JSON API (/api/), no dependencies.
// Every value from a job goes into the page as text (textContent), never as HTML; the
// Content-Security-Policy forbids inline scripts as a second line of defence.
// Live data: polling. Each view asks again when its previous answer has come, after
// max(its period, 30 x that answer's time), and not while the tab is hidden, so a large
// deployment is asked less often and an idle tab costs nothing.
"use strict";

const TOKEN_KEY = "nats-cron-token";
const RUN_STATE = ["next_run", "last_run", "last_outcome", "last_error", "last_scheduled",
  "run_count", "paused", "revision"];
const FIELDS = ["subject", "schedule", "timezone", "payload", "jitter", "grace", "start",
  "end", "paused", "extra"];

// --- DOM --------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

const main = () => document.getElementById("main");

// --- time -------------------------------------------------------------------------------

function span(ms) {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours}h ${m % 60}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

function relative(iso) {
  if (!iso) return "";
  const ms = Date.parse(iso) - Date.now();
  if (Number.isNaN(ms)) return String(iso);
  if (Math.abs(ms) < 1000) return "now";
  return ms > 0 ? `in ${span(ms)}` : `${span(ms)} ago`;
}

function utc(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function timeCell(iso) {
  return iso ? h("time", { datetime: iso, title: utc(iso) }, relative(iso)) : "–";
}

// --- the API ----------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token && method !== "GET") headers.Authorization = `Bearer ${token}`;
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiFailure(0, `this instance does not answer (${err.message})`);
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (response.ok) return data;
    const message = (data && data.error) || `${response.status} ${response.statusText}`;
    if (response.status === 401 && attempt < 3) { // ask, and ask again if refused
      if (token) sessionStorage.removeItem(TOKEN_KEY); // refused: ask again
      const given = await askToken(token ? "That token was refused." : "");
      if (given) {
        sessionStorage.setItem(TOKEN_KEY, given);
        continue;
      }
    }
    throw new ApiFailure(response.status, message);
  }
}

function askToken(why) {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = "";
  const form = document.getElementById("token-form");
  form.querySelector(".why")?.remove();
  if (why) form.querySelector("h2").after(h("p", { class: "why bad" }, why));
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" && input.value ? input.value : null),
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

const jobPath = (subject) => `/api/jobs/${encodeURIComponent(subject)}`;

// --- notices ----------------------------------------------------------------------------

let noticeTimer = null;

function notify(message, bad) {
  const el = document.getElementById("notice");
  setText(el, message);
  el.className = bad ? "notice bad" : "notice";
  el.hidden = false;
  clearTimeout(noticeTimer);
  if (!bad) noticeTimer = setTimeout(() => { el.hidden = true; }, 4000);
}

function clearNotice(onlyBad) {
  const el = document.getElementById("notice");
  if (!onlyBad || el.classList.contains("bad")) el.hidden = true;
}

// --- polling ----------------------------------------------------------------------------

let generation = 0; // a new view stops the polls of the previous one

function poll(period, step) {
  const mine = generation;
  let timer = null;
  let failed = false;
  const run = async () => {
    if (mine !== generation) return;
    if (document.hidden) {
      document.addEventListener("visibilitychange", run, { once: true });
      return;
    }
    const started = performance.now();
    try {
      await step();
      if (failed) clearNotice();
      failed = false;
    } catch (err) {
      if (mine === generation) notify(err.message, true);
      failed = true;
    }
    if (mine !== generation) return;
    const took = performance.now() - started;
    timer = setTimeout(run, Math.max(period, 30 * took));
  };
  run();
  return () => { clearTimeout(timer); run(); }; // ask again now
}

// --- header -----------------------------------------------------------------------------

function showWho(status) {
  const who = document.getElementById("who");
  let lead;
  if (Array.isArray(status.shards)) {
    const led = status.shards.filter((s) => s && s.owner).length;
    lead = `${led} of ${status.shards.length} shards led`;
  } else {
    lead = status.leader ? `leader ${status.leader.instance_id}` : "no leader (election)";
  }
  setText(who, `${status.instance_id}${status.is_leader ? " (leads)" : ""} · ${lead}`);
  who.title = `answered by ${status.instance_id}, version ${status.version}`;
}

// --- schedules --------------------------------------------------------------------------

function asWritten(schedule) {
  if (!schedule || typeof schedule !== "object") return "";
  for (const key of ["cron", "every", "at"]) {
    if (schedule[key] !== undefined) return `${key}: ${schedule[key]}`;
  }
  return JSON.stringify(schedule);
}

function scalar(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function outcomeBadge(outcome, error) {
  if (!outcome) return h("span", { class: "muted" }, "–");
  const good = ["fired", "caught_up", "succeeded", "stored"].includes(outcome);
  return h("span", { class: `badge ${good ? "ok" : "bad"}`, title: error || null }, outcome);
}

// --- actions ----------------------------------------------------------------------------

async function act(subject, action, refresh) {
  const labels = { pause: "paused", resume: "resumed", trigger: "triggered", force: "run once" };
  const path = `${jobPath(subject)}/${action === "force" ? "trigger" : action}`;
  try {
    await api("POST", path, action === "force" ? { force: true } : {});
    notify(`${subject}: ${labels[action]}`);
  } catch (err) {
    notify(`${subject}: ${err.message}`, true);
  }
  refresh();
}

function actionButtons(job, refresh) {
  const subject = job.target.subject;
  const box = h("span", { class: "actions" });
  const toggle = h("button", { type: "button", class: "toggle" });
  const fire = h("button", { type: "button", class: "trigger" });
  toggle.addEventListener("click", () =>
    act(subject, toggle.dataset.action, refresh));
  fire.addEventListener("click", () => act(subject, fire.dataset.action, refresh));
  box.append(toggle, fire);
  updateButtons(box, job);
  return box;
}

function updateButtons(box, job) {
  const [toggle, fire] = box.querySelectorAll("button");
  const paused = !!job.paused;
  toggle.dataset.action = paused ? "resume" : "pause";
  setText(toggle, paused ? "Resume" : "Pause");
  toggle.className = paused ? "toggle resume" : "toggle pause";
  fire.dataset.action = paused ? "force" : "trigger";
  setText(fire, paused ? "Run once" : "Trigger");
  fire.title = paused ? "fire once now; the job stays paused" : "fire once now";
}

// --- the jobs table ---------------------------------------------------------------------

const COLUMNS = [
  ["subject", "Subject"], ["schedule", "Schedule"], ["next", "Next run"],
  ["last", "Last run"], ["outcome", "Last outcome"], ["success", "Last success"],
  ["paused", "Paused"], ["actions", ""],
];

function jobsView(params) {
  let pattern = params.get("pattern") || "";
  const input = h("input", {
    id: "pattern", type: "search", value: pattern, placeholder: "subject or pattern: orders.>",
    autocomplete: "off", spellcheck: "false", "aria-describedby": "err-pattern",
  });
  const patternError = h("p", { id: "err-pattern", class: "field-error" });
  const updated = h("span", { class: "muted updated" });
  const head = h("tr", {}, COLUMNS.map(([key, label]) => h("th", { class: `c-${key}` }, label)));
  const body = h("tbody");
  const table = h("table", { class: "jobs" }, h("thead", {}, head), body);
  const empty = h("p", { class: "empty muted", hidden: true });
  const more = h("p", { class: "more muted", hidden: true });
  main().replaceChildren(
    h("section", {},
      h("div", { class: "toolbar" },
        h("label", { for: "pattern" }, "Filter"), input,
        h("a", { class: "button primary", href: "#/new" }, "New job"), updated),
      patternError, table, empty, more),
  );
  const rows = new Map();
  let refresh = () => {};
  let timer = null;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      pattern = input.value.trim();
      history.replaceState(null, "", pattern ? `#/?pattern=${encodeURIComponent(pattern)}` : "#/");
      refresh();
    }, 300);
  });

  const render = (reply) => {
    const jobs = reply.jobs;
    table.classList.toggle("with-success", jobs.some((j) => "last_success" in j));
    const seen = new Set();
    for (const job of jobs) {
      const subject = job.target.subject;
      seen.add(subject);
      let row = rows.get(subject);
      if (!row) {
        row = newRow(job, () => refresh());
        rows.set(subject, row);
      }
      fillRow(row, job, reply.words[subject]);
      body.append(row); // in subject order
    }
    for (const [subject, row] of rows) {
      if (!seen.has(subject)) {
        row.remove();
        rows.delete(subject);
      }
    }
    empty.hidden = jobs.length > 0;
    setText(empty, pattern ? `No job matches ${pattern}.` : "No jobs yet.");
    more.hidden = !reply.next;
    setText(more, `Only the first ${jobs.length} jobs are shown: narrow the filter.`);
    setText(updated, `updated ${new Date().toLocaleTimeString()}`);
  };

  refresh = poll(2000, async () => {
    const query = pattern ? `?pattern=${encodeURIComponent(pattern)}` : "";
    let reply;
    try {
      reply = await api("GET", `/api/jobs${query}`);
    } catch (err) {
      if (err.status === 400) {
        setText(patternError, err.message);
        input.setAttribute("aria-invalid", "true");
        return;
      }
      throw err;
    }
    setText(patternError, "");
    input.removeAttribute("aria-invalid");
    render(reply);
    showWho(await api("GET", "/api/status"));
  });
}

function newRow(job, refresh) {
  const subject = job.target.subject;
  const cells = {};
  for (const [key, label] of COLUMNS) {
    cells[key] = h("td", { class: `c-${key}`, "data-label": label });
  }
  cells.subject.append(h("a", { href: `#/job/${encodeURIComponent(subject)}` }, subject));
  cells.schedule.append(h("div", {}, h("span", { class: "words" }),
    h("code", { class: "written" })));
  cells.actions.append(actionButtons(job, refresh));
  const row = h("tr", { "data-subject": subject }, Object.values(cells));
  row.cells_ = cells;
  return row;
}

function fillRow(row, job, words) {
  const c = row.cells_;
  setText(c.schedule.querySelector(".words"), words || "");
  setText(c.schedule.querySelector(".written"), asWritten(job.schedule));
  c.next.replaceChildren(job.paused && !job.next_run ? h("span", { class: "muted" }, "paused")
    : timeCell(job.next_run));
  c.last.replaceChildren(timeCell(job.last_run));
  c.outcome.replaceChildren(outcomeBadge(job.last_outcome, job.last_error));
  c.success.replaceChildren(timeCell(job.last_success));
  setText(c.paused, job.paused ? "paused" : "no");
  c.paused.classList.toggle("is-paused", !!job.paused);
  row.classList.toggle("paused", !!job.paused);
  updateButtons(c.actions.querySelector(".actions"), job);
}

// --- a job's page -----------------------------------------------------------------------

function kvList(entries) {
  return h("dl", { class: "kv" }, entries.map(([key, value]) => [
    h("dt", {}, key), h("dd", {}, value instanceof Node ? value : scalar(value)),
  ]));
}

function jobView(subject) {
  const title = h("h1", { class: "subject" }, subject);
  const words = h("p", { class: "words" });
  const state = h("div");
  const next = h("div");
  const runs = h("div");
  const doc = h("pre", { class: "document" });
  let current = null;
  let refresh = () => {};
  const toggle = h("button", { type: "button", class: "toggle" });
  const fire = h("button", { type: "button", class: "trigger" });
  const box = h("span", { class: "actions" }, toggle, fire);
  toggle.addEventListener("click", () => act(subject, toggle.dataset.action, refresh));
  fire.addEventListener("click", () => act(subject, fire.dataset.action, refresh));
  const remove = h("button", { type: "button", class: "danger delete" }, "Delete");
  remove.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${subject} and its history?`)) return;
    try {
      await api("DELETE", jobPath(subject));
      notify(`${subject}: deleted`);
      location.hash = "#/";
    } catch (err) {
      notify(`${subject}: ${err.message}`, true);
    }
  });
  main().replaceChildren(h("section", {},
    h("div", { class: "title" }, title,
      h("div", { class: "buttons" }, box,
        h("a", { class: "button", href: `#/edit/${encodeURIComponent(subject)}` }, "Edit"),
        remove)),
    words,
    h("h2", {}, "State"), state,
    h("h2", {}, "Next fire times"), next,
    h("h2", {}, "History"), runs,
    h("h2", {}, "Job (as the API returns it)"), doc));

  refresh = poll(3000, async () => {
    let reply;
    try {
      reply = await api("GET", `${jobPath(subject)}?limit=50`);
    } catch (err) {
      if (err.status === 404) {
        main().replaceChildren(h("section", {}, h("h1", {}, subject),
          h("p", { class: "bad" }, err.message), h("a", { href: "#/" }, "All jobs")));
        generation++;
        return;
      }
      throw err;
    }
    current = reply.job;
    updateButtons(box, current);
    setText(words, reply.words);
    const entries = [["schedule", h("code", {}, asWritten(current.schedule))]];
    for (const [key, value] of Object.entries(current)) {
      if (["target", "schedule", "payload"].includes(key)) continue;
      if (key.endsWith("_run") || key === "last_scheduled" || key === "last_success") {
        entries.push([key, value ? h("span", {}, utc(value), " ",
          h("span", { class: "muted" }, `(${relative(value)})`)) : "–"]);
      } else if (key === "last_outcome") {
        entries.push([key, outcomeBadge(value, current.last_error)]);
      } else {
        entries.push([key, value]);
      }
    }
    state.replaceChildren(kvList(entries));
    next.replaceChildren(timesTable(reply.next, reply.timezone,
      current.paused ? "Paused: the times it would fire at once resumed." : ""));
    runs.replaceChildren(historyTable(reply.history));
    setText(doc, JSON.stringify(current, null, 2));
  });
}

function timesTable(times, zone, note) {
  if (!times || !times.length) return h("p", { class: "muted" }, "It never fires again.");
  const rows = times.map((t, i) => h("tr", {},
    h("td", {}, i + 1), h("td", {}, utc(t.utc)),
    zone !== "UTC" ? h("td", {}, t.local.replace("T", " ").replace(/\.000(?=[+-]|Z)/, ""))
      : null));
  return h("div", {}, note ? h("p", { class: "muted" }, note) : null,
    h("table", { class: "times" },
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "UTC"),
        zone !== "UTC" ? h("th", {}, zone) : null)),
      h("tbody", {}, rows)));
}

const RUN_COLUMNS = ["scheduled", "actual", "outcome", "instance", "epoch", "error"];

function historyTable(runs) {
  if (runs === null) return h("p", { class: "muted" }, "No history on this instance.");
  if (!runs.length) return h("p", { class: "muted" }, "No runs yet.");
  const extra = [...new Set(runs.flatMap((r) => Object.keys(r)))]
    .filter((k) => !RUN_COLUMNS.includes(k) && k !== "subject");
  const head = h("tr", {}, [...RUN_COLUMNS, "late", ...extra].map((c) => h("th", {}, c)));
  const rows = runs.map((run) => {
    const late = Date.parse(run.actual) - Date.parse(run.scheduled);
    return h("tr", { class: "run" },
      h("td", { "data-label": "scheduled" }, utc(run.scheduled)),
      h("td", { "data-label": "actual" }, utc(run.actual)),
      h("td", { "data-label": "outcome" }, outcomeBadge(run.outcome, run.error)),
      h("td", { "data-label": "instance" }, scalar(run.instance)),
      h("td", { "data-label": "epoch" }, scalar(run.epoch)),
      h("td", { "data-label": "error" }, run.error ? run.error : "–"),
      h("td", { "data-label": "late" }, Number.isNaN(late) ? "–" : `${late} ms`),
      extra.map((k) => h("td", { "data-label": k }, scalar(run[k]))));
  });
  return h("table", { class: "history" }, h("thead", {}, head), h("tbody", {}, rows));
}

// --- the form ---------------------------------------------------------------------------

const FORM_KEYS = ["target", "subject", "schedule", "payload", "paused", ...RUN_STATE];
const SCHEDULE_KEYS = ["every", "cron", "at", "timezone", "jitter", "grace", "start", "end",
  "paused"];

function field(name, label, control, hint) {
  return h("div", { class: "field", "data-field": name },
    h("label", { for: control.id }, label), control,
    hint ? h("p", { class: "hint muted" }, hint) : null,
    h("p", { class: "field-error", id: `err-${name}`, role: "alert" }));
}

function fieldOf(message) {
  const path = message.split(":")[0].trim();
  const map = [
    ["target.subject", "subject"], ["subject", "subject"], ["schedule.timezone", "timezone"],
    ["schedule.jitter", "jitter"], ["schedule.grace", "grace"], ["schedule.start", "start"],
    ["schedule.end", "end"], ["schedule.every", "schedule"], ["schedule.cron", "schedule"],
    ["schedule.at", "schedule"], ["schedule", "schedule"], ["payload", "payload"],
    ["paused", "paused"], ["extra", "extra"],
  ];
  for (const [prefix, name] of map) {
    if (path === prefix || path.startsWith(`${prefix}.`)) return name;
  }
  return null;
}

function formView(subject) {
  const editing = subject !== null;
  const input = (id, attrs) => h("input", { id, autocomplete: "off", spellcheck: "false",
    ...attrs });
  const f = {
    subject: input("f-subject", { placeholder: "reports.daily", disabled: editing }),
    kind: h("select", { id: "f-kind" },
      h("option", { value: "cron" }, "cron"), h("option", { value: "every" }, "every"),
      h("option", { value: "at" }, "at (once)")),
    schedule: input("f-schedule", { placeholder: "0 9 * * MON-FRI" }),
    timezone: input("f-timezone", { placeholder: "UTC", list: "zones" }),
    ptype: h("select", { id: "f-ptype" },
      h("option", { value: "" }, "none (a ULID per fire)"), h("option", { value: "json" }, "json"),
      h("option", { value: "text" }, "text"), h("option", { value: "base64" }, "base64"),
      h("option", { value: "raw" }, "raw (sent verbatim)")),
    pdata: h("textarea", { id: "f-pdata", rows: 3, spellcheck: "false" }),
    jitter: input("f-jitter", { placeholder: "e.g. 30s" }),
    grace: input("f-grace", { placeholder: "default of the service (1h)" }),
    start: input("f-start", { placeholder: "2026-01-01T00:00:00Z" }),
    end: input("f-end", { placeholder: "RFC 3339" }),
    paused: h("input", { id: "f-paused", type: "checkbox" }),
    extra: h("textarea", { id: "f-extra", rows: 3, spellcheck: "false",
      placeholder: "{\"delivery\": {...}}" }),
  };
  const zones = h("datalist", { id: "zones" },
    (Intl.supportedValuesOf ? Intl.supportedValuesOf("timeZone") : ["UTC"])
      .map((z) => h("option", { value: z })));
  const formError = h("p", { class: "field-error form-error", id: "err-form", role: "alert" });
  const preview = h("div", { class: "preview", id: "preview" },
    h("p", { class: "muted" }, "The next fire times show here as you type."));
  const submit = h("button", { type: "submit", class: "primary", id: "f-submit" },
    editing ? "Save changes" : "Create job");
  const form = h("form", { class: "job-form", novalidate: true },
    field("subject", "Subject", f.subject, "The subject each fire is published to."),
    h("div", { class: "row" },
      field("kind", "Schedule", f.kind),
      field("schedule", "Expression", f.schedule,
        "cron: 5 fields (or 6 with seconds), @daily…; every: 30s, 1h30m; at: RFC 3339")),
    field("timezone", "Time zone (cron)", f.timezone),
    h("div", { class: "row" }, field("ptype", "Payload type", f.ptype),
      field("payload", "Payload", f.pdata)),
    h("details", {}, h("summary", {}, "More: jitter, grace, start, end, other fields"),
      h("div", { class: "row" }, field("jitter", "Jitter", f.jitter),
        field("grace", "Grace", f.grace)),
      h("div", { class: "row" }, field("start", "Start", f.start), field("end", "End", f.end)),
      field("extra", "Other fields of the document (JSON object)", f.extra,
        "Kept as they are: fields this form does not know (e.g. delivery).")),
    h("div", { class: "field check" }, f.paused, h("label", { for: "f-paused" }, "Paused"),
      h("p", { class: "field-error", id: "err-paused" })),
    formError,
    h("div", { class: "buttons" }, submit,
      h("a", { class: "button", href: editing ? `#/job/${encodeURIComponent(subject)}` : "#/" },
        "Cancel")));
  main().replaceChildren(h("section", { class: "form-page" },
    h("h1", {}, editing ? `Edit ${subject}` : "New job"),
    h("div", { class: "split" }, form, h("aside", {}, h("h2", {}, "Preview"), preview)),
    zones));

  let revision = null;
  let stored = null;

  function extraObject() {
    const text = f.extra.value.trim();
    if (!text) return {};
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      throw new ApiFailure(400, `extra: not valid JSON (${err.message})`);
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) {
      throw new ApiFailure(400, "extra: must be a JSON object of document fields");
    }
    return value;
  }

  function documentOf(forPreview) {
    const schedule = { ...(stored ? pick(stored.schedule, (k) => !SCHEDULE_KEYS.includes(k))
      : {}) };
    schedule[f.kind.value] = f.schedule.value.trim();
    for (const key of ["timezone", "jitter", "grace", "start", "end"]) {
      const value = f[key].value.trim();
      if (value) schedule[key] = value;
    }
    const subjectValue = f.subject.value.trim() || (forPreview ? "preview" : "");
    const doc = { ...extraObject(), target: { subject: subjectValue }, schedule,
      paused: f.paused.checked };
    if (f.ptype.value) {
      doc.payload = { data: f.pdata.value };
      if (f.ptype.value !== "raw") doc.payload.type = f.ptype.value;
    }
    return doc;
  }

  function showErrors(message) {
    for (const name of FIELDS) setText(document.getElementById(`err-${name}`), "");
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    setText(formError, "");
    if (!message) return;
    const name = fieldOf(message);
    const target = name && document.getElementById(`err-${name}`);
    if (target) {
      setText(target, message);
      const control = { subject: f.subject, schedule: f.schedule, timezone: f.timezone,
        payload: f.pdata, jitter: f.jitter, grace: f.grace, start: f.start, end: f.end,
        paused: f.paused, extra: f.extra }[name];
      control.setAttribute("aria-invalid", "true");
      if (name === "extra" || ["jitter", "grace", "start", "end"].includes(name)) {
        form.querySelector("details").open = true;
      }
    } else {
      setText(formError, message);
    }
  }

  let asked = 0;
  let previewTimer = null;
  async function runPreview() {
    const mine = ++asked;
    if (!f.schedule.value.trim()) {
      preview.replaceChildren(h("p", { class: "muted" }, "Give a schedule to see its fire times."));
      return;
    }
    let reply;
    try {
      reply = await api("POST", "/api/preview", documentOf(true));
    } catch (err) {
      if (mine !== asked) return;
      const name = fieldOf(err.message);
      if (!f.subject.value.trim() && name === "subject") return;
      showErrors(err.message);
      preview.replaceChildren(h("p", { class: "bad" }, "Not valid: see the field."));
      return;
    }
    if (mine !== asked) return;
    showErrors(null);
    preview.replaceChildren(h("p", { class: "words" }, reply.words),
      timesTable(reply.next, reply.timezone, ""));
  }
  form.addEventListener("input", () => {
    clearTimeout(previewTimer);
    previewTimer = setTimeout(runPreview, 250);
  });
  f.ptype.addEventListener("change", () => { f.pdata.disabled = !f.ptype.value; });
  f.pdata.disabled = true;

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearTimeout(previewTimer);
    asked++;
    let doc;
    try {
      doc = documentOf(false);
    } catch (err) {
      showErrors(err.message);
      return;
    }
    submit.disabled = true;
    try {
      if (editing) {
        await api("PUT", jobPath(subject), revision === null ? doc : { ...doc, revision });
      } else {
        await api("POST", "/api/jobs", doc);
      }
      notify(`${doc.target.subject}: ${editing ? "saved" : "created"}`);
      location.hash = `#/job/${encodeURIComponent(doc.target.subject)}`;
    } catch (err) {
      showErrors(err.status === 409 && editing
        ? `${err.message} (reload the page to edit the new version)` : err.message);
    } finally {
      submit.disabled = false;
    }
  });

  if (editing) {
    submit.disabled = true;
    api("GET", jobPath(subject)).then((reply) => {
      const job = reply.job;
      stored = job;
      revision = job.revision ?? null;
      f.subject.value = job.target.subject;
      const s = job.schedule || {};
      const kind = ["cron", "every", "at"].find((k) => s[k] !== undefined) || "cron";
      f.kind.value = kind;
      f.schedule.value = s[kind] ?? "";
      for (const key of ["timezone", "jitter", "grace", "start", "end"]) f[key].value = s[key] ?? "";
      if (job.payload) {
        f.ptype.value = job.payload.type || "raw";
        f.pdata.value = job.payload.data ?? "";
        f.pdata.disabled = false;
      }
      f.paused.checked = !!job.paused;
      const extra = pick(job, (k) => !FORM_KEYS.includes(k) && !isRunState(job, k));
      f.extra.value = Object.keys(extra).length ? JSON.stringify(extra, null, 2) : "";
      submit.disabled = false;
      runPreview();
    }, (err) => showErrors(err.message));
  } else {
    f.subject.focus();
  }
}

// Run state a `get` adds (the document's own fields are the rest): the known ones, and
// anything named like them (`last_*`, `*_run`, counters), which the service accepts back
// and ignores anyway.
function isRunState(job, key) {
  return RUN_STATE.includes(key) || key.startsWith("last_") || key.endsWith("_run")
    || key.startsWith("consecutive_");
}

function pick(object, keep) {
  return Object.fromEntries(Object.entries(object || {}).filter(([k]) => keep(k)));
}

// --- the cluster ------------------------------------------------------------------------

function clusterView() {
  const status = h("div");
  const shards = h("div");
  const instances = h("div");
  const figures = h("div");
  main().replaceChildren(h("section", {},
    h("h1", {}, "Cluster"),
    h("h2", {}, "Status"), status, shards,
    h("h2", {}, "Instances"), instances,
    h("h2", {}, "This instance's figures"),
    h("p", { class: "muted" }, "From its metrics (all of them: ",
      h("a", { href: "/metrics" }, "/metrics"), ")."), figures));
  poll(5000, async () => {
    const reply = await api("GET", "/api/status");
    showWho(reply);
    const entries = Object.entries(reply).filter(([k]) => k !== "shards")
      .map(([k, v]) => [k, k === "leader" && v ? `${v.instance_id} (epoch ${v.epoch}, since ${utc(v.since)})` : v]);
    status.replaceChildren(kvList(entries));
    shards.replaceChildren(Array.isArray(reply.shards) ? objectTable(reply.shards, "shards") : "");
    const found = await api("GET", "/api/instances");
    instances.replaceChildren(instancesTable(found.instances));
    figures.replaceChildren(kvList(Object.entries(found.figures)));
  });
}

function objectTable(rows, cls) {
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r || {})))];
  return h("table", { class: cls },
    h("thead", {}, h("tr", {}, keys.map((k) => h("th", {}, k)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, keys.map((k) =>
      h("td", { "data-label": k }, k === "since" ? utc(r[k]) : scalar(r[k])))))));
}

function instancesTable(list) {
  if (!list.length) return h("p", { class: "muted" }, "No instance answered discovery.");
  const rows = list.map((i) => {
    const busiest = Object.entries(i.endpoints || {})
      .sort((a, b) => b[1].requests - a[1].requests)[0];
    return h("tr", { "data-instance": i.instance_id },
      h("td", { "data-label": "instance" }, i.instance_id),
      h("td", { "data-label": "role" }, h("span", { class: `badge ${i.role === "leader" ? "ok" : ""}` }, i.role)),
      h("td", { "data-label": "shards" }, i.shards.length ? i.shards.join(", ") : "–"),
      h("td", { "data-label": "version" }, scalar(i.version)),
      h("td", { "data-label": "started" }, i.started ? relative(i.started) : "–"),
      h("td", { "data-label": "requests" }, i.requests),
      h("td", { "data-label": "errors" }, i.errors),
      h("td", { "data-label": "busiest" },
        busiest && busiest[1].requests ? `${busiest[0]} (${busiest[1].requests})` : "–"));
  });
  return h("table", { class: "instances" },
    h("thead", {}, h("tr", {}, ["instance", "role", "shards", "version", "started",
      "requests", "errors", "busiest endpoint"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows));
}

// --- routing ----------------------------------------------------------------------------

function route() {
  generation++;
  clearNotice(true); // a success notice outlives the navigation it caused
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  let nav = "jobs";
  if (path.startsWith("/job/")) {
    jobView(decodeURIComponent(path.slice(5)));
  } else if (path.startsWith("/edit/")) {
    formView(decodeURIComponent(path.slice(6)));
  } else if (path === "/new") {
    nav = "new";
    formView(null);
  } else if (path === "/cluster") {
    nav = "cluster";
    clusterView();
  } else {
    jobsView(params);
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.dataset.nav === nav);
  }
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", route);
