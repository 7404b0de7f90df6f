// The jobqueue dashboard: one EventSource on /events keeps the page live; no polling. The
// last hour's chart reads GET /throughput when a job finishes, and once a minute as it slides.
"use strict";

const MAX_JOBS = 50;        // job cards kept on the page
const MAX_THUMBNAILS = 24;  // page thumbnails shown per pdf2image job
const THUMBNAIL_WIDTH = 128;  // one of the widths the server makes (?w= is rounded up)
const PREVIEW = "fps=12&width=480";

// With JOBQUEUE_API_KEYS set, the key typed in is kept for this tab only (sessionStorage) and
// sent as X-API-Key. <img>, links and EventSource cannot send headers: their URLs carry an
// access token instead, which the key buys from POST /access-token (read-only, expiring).
const KEY_STORAGE = "jobqueue-api-key";
let accessToken = "";

const jobs = new Map();     // id -> {view, element}
const submittedHere = new Set();  // ids of jobs this page submitted: their previews play
const played = new Set();         // ids whose preview has played by itself once

function $(selector, root = document) {
  return root.querySelector(selector);
}

// ---- API key ----

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function keyHeaders() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function useKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

// A fresh token for URLs; false when the key is not accepted.
async function renewToken() {
  if (!apiKey()) return true;
  const response = await fetch("/access-token", { method: "POST", headers: keyHeaders() });
  if (!response.ok) return false;
  accessToken = (await response.json()).token;
  return true;
}

function withToken(url) {
  if (!accessToken) return url;
  return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(accessToken);
}

function askForKey(text) {
  $("#key-form").hidden = false;
  $("#key-message").textContent = text;
  setConnection($("#connection"), "down", "needs an API key");
}

// ---- live updates ----

let events = null;

async function connect() {
  const connection = $("#connection");
  if (events) events.close();
  if (!(await renewToken())) {
    askForKey("That key is not valid here.");
    return;
  }
  events = new EventSource(withToken("/events?limit=" + MAX_JOBS));
  events.onopen = () => {
    setConnection(connection, "live", "live");
    $("#key-form").hidden = true;
    refreshChart();
  };
  events.onerror = async () => {
    setConnection(connection, "down", "reconnecting…");
    // EventSource does not say why; a 401 means the key is missing or wrong: stop retrying.
    const check = await fetch("/jobs?limit=1", { headers: keyHeaders() }).catch(() => null);
    if (check && check.status === 401) {
      events.close();
      askForKey(apiKey() ? "That key is not valid here." : "");
    } else if (check && accessToken) {
      events.close();  // the token may have expired: reconnect with a new one
      setTimeout(connect, 1000);
    }
  };
  events.addEventListener("queues", (event) => showQueues(JSON.parse(event.data)));
  events.addEventListener("workers", (event) => showWorkers(JSON.parse(event.data)));
  events.addEventListener("jobs", (event) => {
    // Sent again after every reconnect: start over from it.
    for (const { element } of jobs.values()) dropCard(element);
    jobs.clear();
    for (const view of JSON.parse(event.data)) showJob(view);
    $("#no-jobs").hidden = jobs.size > 0;
  });
  events.addEventListener("job", (event) => {
    const view = JSON.parse(event.data);
    showJob(view);
    if (isFinished(view.status)) chartSoon();
  });
  events.addEventListener("removed", (event) => removeJob(JSON.parse(event.data).id));
}

function setConnection(element, state, text) {
  element.dataset.state = state;
  element.textContent = text;
}

function showQueues(queues) {
  for (const [kind, stats] of Object.entries(queues)) {
    const row = $(`#queues tr[data-kind="${kind}"]`);
    if (!row) continue;
    for (const key of ["workers", "busy", "queued", "capacity"]) {
      $("." + key, row).textContent = stats[key];
    }
    $(".fill", row).style.width = percent(stats.queued, stats.capacity);
  }
}

// Distributed mode only: the worker processes whose heartbeat is fresh.
function showWorkers(processes) {
  const line = $("#worker-processes");
  line.hidden = false;
  line.textContent = processes.length === 0
    ? "No live worker process: jobs wait until one starts."
    : "Worker processes: " + processes.map((p) => `${p.name} (` +
        Object.entries(p.kinds).map(([kind, n]) => `${kind} ×${n}`).join(", ") + ")").join(" · ");
}

// ---- the last hour: jobs finished per minute, run time p50/p95 (uPlot) ----

const CHART_MINUTES = 60;
const CHART_COLORS = ["#2f6fde", "#1f8a4c", "#b7791f", "#8e44ad", "#c23a3a", "#16a2b8"];
let charts = null;       // {finished, runtime, kinds}: made on the first answer
let chartTimer = null;

// Several jobs finishing together ask once.
function chartSoon() {
  if (chartTimer === null) chartTimer = setTimeout(refreshChart, 1000);
}

async function refreshChart() {
  chartTimer = null;
  const response = await fetch("/throughput?minutes=" + CHART_MINUTES, { headers: keyHeaders() })
    .catch(() => null);
  if (!response || !response.ok) return;
  showThroughput(await response.json());
}

function showThroughput(answer) {
  // Every minute of the window, so the chart always spans the hour; a quiet minute is 0.
  // The server's clock, not the browser's: the rows are keyed by its minutes.
  const minutes = Array.from({ length: answer.minutes }, (_, i) => answer.since + i * 60);
  const kinds = Object.keys(answer.kinds);
  const finished = [], p50 = [], p95 = [];
  const summary = [];
  let total = 0;
  for (const kind of kinds) {
    const byMinute = new Map(answer.kinds[kind].map((m) => [m.minute, m]));
    finished.push(minutes.map((m) => byMinute.get(m)?.finished ?? 0));
    p50.push(minutes.map((m) => byMinute.get(m)?.p50Seconds ?? null));
    p95.push(minutes.map((m) => byMinute.get(m)?.p95Seconds ?? null));
    const count = answer.kinds[kind].reduce((sum, m) => sum + m.finished, 0);
    total += count;
    if (count) summary.push(`${kind} ${count}`);
  }
  const text = $("#throughput-summary");
  text.textContent = total === 0 ? "No jobs finished in the last hour."
    : `${total} job${total === 1 ? "" : "s"} finished in the last hour: ${summary.join(", ")}.`;
  text.dataset.total = total;
  const runtime = [];
  kinds.forEach((_, i) => runtime.push(p50[i], p95[i]));
  if (!charts || charts.kinds.join() !== kinds.join()) makeCharts(kinds);
  charts.finished.setData([minutes, ...finished]);
  charts.runtime.setData([minutes, ...runtime]);
}

function makeCharts(kinds) {
  if (charts) {
    charts.finished.destroy();
    charts.runtime.destroy();
  }
  const color = (i) => CHART_COLORS[i % CHART_COLORS.length];
  const width = $("#finished-chart").clientWidth || 400;
  const options = (series, axisLabel) => ({
    width, height: 150, legend: { live: false }, cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true } },
    axes: [{}, { label: axisLabel, size: 50 }],
    series: [{}, ...series],
  });
  charts = {
    kinds,
    finished: new uPlot(options(kinds.map((kind, i) => ({ label: kind, stroke: color(i), width: 1.5 })),
                                "jobs/min"), [[]], $("#finished-chart")),
    runtime: new uPlot(options(kinds.flatMap((kind, i) => [
      // Points too: a minute between two quiet ones has no line to draw.
      { label: `${kind} p50`, stroke: color(i), width: 1.5, points: { show: true, size: 4 } },
      { label: `${kind} p95`, stroke: color(i), width: 1, dash: [4, 4], points: { show: true, size: 3 } },
    ]), "s"), [[]], $("#runtime-chart")),
  };
}

// ---- job cards ----

function showJob(view) {
  let entry = jobs.get(view.id);
  if (!entry) {
    entry = { view, element: newJobElement(view) };
    jobs.set(view.id, entry);
    insertByAge(entry.element, view.createdAt);
    trimJobs();
  }
  const card = entry.element;
  // A video that finishes while the page watches plays its preview at once.
  const seenRunning = card.dataset.status && !isFinished(card.dataset.status);
  entry.view = view;
  card.dataset.status = view.status;
  $(".status", card).textContent = view.status;
  $(".fill", card).style.width = view.status === "succeeded"
    ? "100%" : percent(view.progress.done, view.progress.total);
  $(".progress-text", card).textContent = progressText(view);
  const finished = isFinished(view.status);
  $(".cancel", card).hidden = finished;
  $(".delete", card).hidden = !finished;
  const result = $(".result", card);
  result.hidden = view.status !== "succeeded";
  result.href = withToken(`/jobs/${view.id}/result`);
  const error = $(".error", card);
  error.hidden = !view.error;
  error.textContent = view.error || "";
  if (view.status === "succeeded" && !card.dataset.media) {
    card.dataset.media = "shown";
    showMedia(card, view, seenRunning || submittedHere.has(view.id));
  }
  $("#no-jobs").hidden = jobs.size > 0;
}

function newJobElement(view) {
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  card.dataset.id = view.id;
  card.dataset.created = view.createdAt;
  $(".kind", card).textContent = view.jobType;
  const id = $(".id", card);
  id.textContent = view.id.slice(0, 8);
  id.href = withToken(`/jobs/${view.id}`);
  $(".cancel", card).addEventListener("click", (event) => {
    event.target.hidden = true;  // so a second click cannot delete the job once it ends
    deleteJob(view.id);
  });
  $(".delete", card).addEventListener("click", () => {
    if (confirm("Delete this job and its files?")) deleteJob(view.id);
  });
  return card;
}

function insertByAge(card, createdAt) {
  const list = $("#jobs");
  const older = [...list.children].find((other) => other.dataset.created < createdAt);
  list.insertBefore(card, older || null);
}

function trimJobs() {
  const list = $("#jobs");
  while (list.children.length > MAX_JOBS) {
    const last = list.lastElementChild;
    jobs.delete(last.dataset.id);
    dropCard(last);
  }
}

function removeJob(id) {
  const entry = jobs.get(id);
  if (entry) dropCard(entry.element);
  jobs.delete(id);
  $("#no-jobs").hidden = jobs.size > 0;
}

// A removed <img> keeps its stream open: end the preview first, so its ffmpeg stops.
function dropCard(card) {
  for (const image of card.querySelectorAll("img.preview")) image.removeAttribute("src");
  card.remove();
}

// Thumbnails of a pdf2image job's pages, a preview stream of a video job's output.
function showMedia(card, view, justFinished) {
  const media = $(".media", card);
  const files = view.result.files;
  if (view.jobType === "video") {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "▶ preview";
    button.addEventListener("click", () => playPreview(media, view.id));
    media.append(button);
    if (justFinished && !played.has(view.id)) {
      played.add(view.id);
      playPreview(media, view.id);
    }
  }
  for (const url of files.slice(0, MAX_THUMBNAILS)) {
    const name = url.split("/").pop();
    const link = document.createElement("a");
    link.href = withToken(url);
    link.title = name;
    if (/\.(png|jpe?g)$/i.test(name)) {
      const image = document.createElement("img");
      image.className = "thumbnail";
      image.loading = "lazy";
      image.alt = name;
      image.src = withToken(`${url}?w=${THUMBNAIL_WIDTH}`);
      link.append(image);
    } else {
      link.textContent = name;
    }
    media.append(link);
  }
  if (files.length > MAX_THUMBNAILS) {
    media.append(`+${files.length - MAX_THUMBNAILS} more in the result`);
  }
}

function playPreview(media, id) {
  let image = $("img.preview", media);
  if (!image) {
    image = document.createElement("img");
    image.className = "preview";
    image.alt = "video preview";
    media.prepend(image);
  }
  image.src = withToken(`/jobs/${id}/preview.mjpg?${PREVIEW}&t=${Date.now()}`);
}

// ---- actions ----

async function deleteJob(id) {
  const response = await fetch(`/jobs/${id}`, { method: "DELETE", headers: keyHeaders() });
  if (!response.ok) showMessage(await errorText(response), true);
}

async function submitJob(event) {
  event.preventDefault();
  const kind = $("#job-type").value;
  const fieldset = $(`fieldset[data-kind="${kind}"]`);
  const body = new FormData();
  body.append("jobType", kind);
  for (const input of fieldset.querySelectorAll("input")) {
    if (input.type === "file") {
      if (input.files.length) body.append(input.name, input.files[0]);
    } else if (input.value !== "") {
      body.append(input.name, input.value);  // empty means the option's default
    }
  }
  const button = $("#submit-form button[type=submit]");
  button.disabled = true;
  showMessage("Sending…", false);
  try {
    const response = await fetch("/jobs", { method: "POST", body, headers: keyHeaders() });
    if (response.status === 202) {
      const accepted = await response.json();
      submittedHere.add(accepted.id);
      showMessage(`Accepted ${accepted.jobType} job ${accepted.id.slice(0, 8)}.`, false);
    } else {
      showMessage(await errorText(response), true);
    }
  } catch (error) {
    showMessage(`The server could not be reached: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

// The server's {"detail": ...}: a sentence, or a list of validation errors.
async function errorText(response) {
  let detail;
  try {
    detail = (await response.json()).detail;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
  if (Array.isArray(detail)) {
    detail = detail.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ");
  }
  return `${response.status}: ${detail}`;
}

function showMessage(text, isError) {
  const message = $("#submit-message");
  message.textContent = text;
  message.classList.toggle("failed", isError);
}

function showKindOptions() {
  const kind = $("#job-type").value;
  for (const fieldset of document.querySelectorAll("fieldset.kind-options")) {
    const chosen = fieldset.dataset.kind === kind;
    fieldset.hidden = !chosen;
    fieldset.disabled = !chosen;
  }
}

// ---- formatting ----

function isFinished(status) {
  return ["succeeded", "failed", "cancelled"].includes(status);
}

function percent(done, total) {
  return total > 0 ? `${Math.min(100, (100 * done) / total).toFixed(1)}%` : "0%";
}

function progressText(view) {
  if (view.status === "queued") {
    return view.queuePosition ? `waiting, position ${view.queuePosition}` : "waiting";
  }
  const { done, total, unit } = view.progress;
  return total > 0 ? `${done} of ${total} ${unit}` : "";
}

function age(createdAt) {
  const seconds = Math.max(0, (Date.now() - Date.parse(createdAt)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

// Ages are worked out here from createdAt; the server is not asked again.
function refreshAges() {
  for (const { view, element } of jobs.values()) {
    $(".age", element).textContent = age(view.createdAt);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#job-type").addEventListener("change", showKindOptions);
  $("#submit-form").addEventListener("submit", submitJob);
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey($("#api-key").value.trim());
    connect();
  });
  showKindOptions();
  if (document.body.dataset.keysRequired === "yes" && !apiKey()) {
    askForKey("");
  } else {
    connect();
  }
  setInterval(refreshAges, 1000);
  setInterval(refreshChart, 60000);
});
