// gptqd dashboard: plain JS, no build step. Lists jobs with live progress (server-sent events
// read through fetch, so an API key can ride along), submits jobs, shows one job's results.
"use strict";

const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("gptqd-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("gptqd-key", keyInput.value.trim());
  route();
});

function headers(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = resp.headers.get("content-type")?.includes("json") ? await resp.json() : null;
  if (!resp.ok) throw new Error(describeError(resp.status, body));
  return body;
}

function describeError(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("\n");
  }
  if (detail && typeof detail === "object") return detail.message || JSON.stringify(detail);
  return detail || `HTTP ${status}`;
}

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value ?? "";
  if (cls) el.className = cls;
  return el;
}

function formatSeconds(s) {
  if (s == null || !isFinite(s)) return "";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

function formatBytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function progressLabel(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return "done";
  if (job.status !== "running") return job.status;
  const parts = [];
  if (p.stage) parts.push(p.stage);
  if (p.block && p.num_blocks) parts.push(`block ${p.block}/${p.num_blocks}`);
  if (p.eta_seconds != null) parts.push(`ETA ${formatSeconds(p.eta_seconds)}`);
  return parts.join(" · ");
}

function setProgress(el, job) {
  const fraction = job.status === "succeeded" ? 1 : (job.progress?.fraction || 0);
  el.querySelector(".bar").style.width = `${(100 * fraction).toFixed(1)}%`;
  el.querySelector(".label").textContent = progressLabel(job);
  el.dataset.fraction = fraction;
}

function progressBar() {
  const el = document.createElement("div");
  el.className = "progress";
  el.append(text("div", "", "bar"), text("span", "", "label"));
  return el;
}

// --- live updates: one event stream per job that is not finished ---------------------------
const streams = new Map();

function follow(jobId, onChange, onEvent) {
  if (streams.has(jobId)) return;
  const controller = new AbortController();
  streams.set(jobId, controller);
  let lastId = null;
  let pending = null;
  const refresh = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try { onChange(await api(`/jobs/${jobId}`)); } catch (e) { /* next event retries */ }
    }, 250);
  };
  (async function read() {
    while (!controller.signal.aborted) {
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId) h["Last-Event-ID"] = lastId;
        const resp = await fetch(`/jobs/${jobId}/events`, { headers: h, signal: controller.signal });
        if (!resp.ok) throw new Error(`events: HTTP ${resp.status}`);
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("id:")) lastId = line.slice(3).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trim();
            }
            if (onEvent && data) { try { onEvent(JSON.parse(data)); } catch (e) { /* not JSON */ } }
            refresh();
          }
        }
        refresh();
        break; // the server ends the stream after the terminal event
      } catch (e) {
        if (controller.signal.aborted) break;
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
    streams.delete(jobId);
  })();
}

function stopFollowing() {
  for (const c of streams.values()) c.abort();
  streams.clear();
}

// --- job list -------------------------------------------------------------------------------
const rows = new Map();

function settingsOf(job) {
  const s = job.spec || {};
  const rules = Object.keys(s.dynamic || {}).length;
  return `${s.bits ?? "?"}-bit g${s.group_size ?? "?"}${s.desc_act ? " act-order" : ""}${s.sym === false ? " asym" : ""}`
    + (rules ? ` +${rules} rule${rules > 1 ? "s" : ""}` : "");
}

function renderRow(job) {
  let row = rows.get(job.id);
  if (!row) {
    row = document.createElement("tr");
    row.className = "job";
    row.dataset.jobId = job.id;
    row.addEventListener("click", () => { location.hash = `#/jobs/${job.id}`; });
    row.append(text("td", ""), text("td", ""), text("td", ""), text("td", ""), document.createElement("td"), text("td", "", "created"));
    row.cells[4].append(progressBar());
    rows.set(job.id, row);
  }
  row.cells[0].textContent = job.name || job.id.slice(0, 12);
  row.cells[1].textContent = job.model_id;
  row.cells[2].textContent = settingsOf(job);
  renderStatus(row.cells[3], job);
  row.dataset.status = job.status;
  setProgress(row.cells[4].firstChild, job);
  row.cells[5].textContent = age(job.created_at);
  row.cells[5].title = new Date(job.created_at).toLocaleString();
  return row;
}

// the status, and under a failed one why (shortened; the whole message on hover)
function renderStatus(cell, job) {
  cell.className = `status ${job.status}`;
  cell.replaceChildren(text("span", job.status));
  if (job.error) {
    const message = job.error.message.length > 60 ? `${job.error.message.slice(0, 59)}…` : job.error.message;
    const why = text("div", `${job.error.code}: ${message}`, "why");
    why.title = job.error.message;
    cell.append(why);
  }
}

// "just now", "3 min ago", "5 h ago", "2 days ago"
function age(timestamp) {
  const iso = /[zZ]|[+-]\d\d:?\d\d$/.test(timestamp) ? timestamp : `${timestamp}Z`; // naive = UTC
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (!isFinite(seconds)) return "";
  if (seconds >= 86400) { const d = Math.floor(seconds / 86400); return `${d} day${d > 1 ? "s" : ""} ago`; }
  if (seconds >= 3600) return `${Math.floor(seconds / 3600)} h ago`;
  if (seconds >= 60) return `${Math.floor(seconds / 60)} min ago`;
  return "just now";
}

async function loadJobs() {
  const status = $("#status-filter").value;
  const page = await api(`/jobs?limit=50${status ? `&status=${status}` : ""}`);
  const body = $("#jobs tbody");
  body.replaceChildren(...page.items.map(renderRow));
  $("#jobs-empty").hidden = page.items.length > 0;
  for (const job of page.items) {
    if (job.status === "queued" || job.status === "running") follow(job.id, renderRow);
  }
}

async function loadDatasets() {
  try {
    const items = await api("/datasets");
    const select = $("#submit-form [name=dataset_id]");
    select.replaceChildren(new Option("(none)", ""), ...(items.items || items).map((d) => new Option(`${d.filename} (${d.id.slice(0, 10)})`, d.id)));
  } catch (e) { /* datasets are optional for the form */ }
}

// an uploaded file becomes the form's calibration dataset
$("#dataset-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  $("#submit-error").textContent = "";
  try {
    const ds = await api("/datasets", { method: "POST", body: form });
    await loadDatasets();
    $("#submit-form [name=dataset_id]").value = ds.id;
  } catch (e) {
    $("#submit-error").textContent = `upload: ${e.message}`;
  }
  event.target.value = "";
});

$("#status-filter").addEventListener("change", () => { stopFollowing(); rows.clear(); loadJobs(); });

$("#submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const f = event.target.elements;
  const calibration = {
    num_samples: Number(f.num_samples.value),
    seq_length: Number(f.seq_length.value),
  };
  if (f.dataset_id.value) {
    calibration.dataset_id = f.dataset_id.value;
  } else {
    calibration.dataset = f.dataset.value.trim();
    if (f.config.value.trim()) calibration.config = f.config.value.trim();
    if (f.split.value.trim()) calibration.split = f.split.value.trim();
  }
  const spec = {
    model_id: f.model_id.value.trim(),
    bits: Number(f.bits.value),
    group_size: Number(f.group_size.value),
    damp_percent: Number(f.damp_percent.value),
    sym: f.sym.checked,
    desc_act: f.desc_act.checked,
    static_groups: f.static_groups.checked,
    tensor_names: f.original_names.checked ? "original" : "module",
    calibration,
  };
  if (f.name.value.trim()) spec.name = f.name.value.trim();
  $("#submit-error").textContent = "";
  if (f.dynamic.value.trim()) {
    try {
      spec.dynamic = JSON.parse(f.dynamic.value);
    } catch (e) {
      $("#submit-error").textContent = `Per-layer rules: not JSON (${e.message})`;
      return;
    }
  }
  try {
    const job = await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(spec) });
    $("#jobs tbody").prepend(renderRow(job));
    $("#jobs-empty").hidden = true;
    follow(job.id, renderRow);
  } catch (e) {
    $("#submit-error").textContent = e.message;
  }
});

// --- one job --------------------------------------------------------------------------------
// per-module GPTQ loss: from progress events while a job runs, from the checkpoint's
// quant_report.json once it has succeeded
let liveLosses = new Map();

function blockOf(name) {
  const m = /\.(\d+)\./.exec(name || "");
  return m ? Number(m[1]) + 1 : null;
}

function onJobEvent(ev) {
  if (ev.type === "progress" && ev.module && ev.loss != null) {
    liveLosses.set(`${ev.block}:${ev.module}`, { name: ev.module, block: ev.block, loss: Number(ev.loss) });
    drawLossChart($("#loss-chart"), [...liveLosses.values()]);
  }
}

async function reportLosses(job) {
  if (!(job.artifacts || []).some((a) => a.name === "quant_report.json")) return null;
  const resp = await fetch(`/jobs/${job.id}/artifacts/quant_report.json`, { headers: headers() });
  if (!resp.ok) return null;
  const report = await resp.json();
  return (report.modules || []).filter((m) => m.loss != null)
    .map((m) => ({ name: m.module || m.name, block: blockOf(m.module || m.name), loss: Number(m.loss) }));
}

// the whole decades around the logs: the axis runs from 10^lo (at or below the smallest loss)
// to 10^hi (at or above the largest), one decade at least. Compared as numbers, not by
// truthiness: Math.ceil of a log in (-1, 0) is -0, which is a real top of 1e0
function decades(logs) {
  const lo = Math.floor(Math.min(...logs));
  const hi = Math.max(Math.ceil(Math.max(...logs)), lo + 1);
  return { lo, hi };
}

function drawLossChart(svg, mods) {
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const W = 720, H = 260, left = 50, bottom = 40, top = 10;
  if (!mods.length) {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", 20); t.setAttribute("y", 30); t.textContent = "no per-layer loss yet";
    svg.append(t);
    return;
  }
  const logs = mods.map((m) => Math.log10(Math.max(m.loss, 1e-12)));
  const { lo, hi } = decades(logs);
  const span = hi - lo;
  const bw = (W - left - 10) / mods.length;
  mods.forEach((m, i) => {
    const h = ((logs[i] - lo) / span) * (H - bottom - top) + 2;
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("class", "bar");
    r.dataset.loss = m.loss;
    r.setAttribute("x", left + i * bw + 1);
    r.setAttribute("width", Math.max(bw - 2, 1));
    r.setAttribute("y", H - bottom - h);
    r.setAttribute("height", h);
    const title = document.createElementNS(NS, "title");
    title.textContent = `${m.name}: ${m.loss.toPrecision(4)}`;
    r.append(title);
    svg.append(r);
  });
  for (let v = lo; v <= hi; v++) {
    const y = H - bottom - ((v - lo) / span) * (H - bottom - top);
    const t = document.createElementNS(NS, "text");
    t.setAttribute("class", "tick");
    t.setAttribute("x", 4); t.setAttribute("y", y + 3); t.textContent = `1e${v}`;
    svg.append(t);
  }
  const blocks = [...new Set(mods.map((m) => m.block))];
  const caption = document.createElementNS(NS, "text");
  caption.setAttribute("x", left); caption.setAttribute("y", H - 10);
  caption.textContent = `${mods.length} modules in ${blocks.length} blocks (log scale, true-sequential order)`;
  svg.append(caption);
}

// the eval text, flagged when it is the text the job calibrated on (the score then flatters)
function evalText(source, heldOut) {
  return heldOut === false ? `${source} (the calibration text itself)` : source;
}

function metricRows(job) {
  const m = job.metrics || {};
  const sizes = m.sizes || {};
  const rows = [
    ["status", job.status],
    ["settings", settingsOf(job)],
    ["perplexity before", m.perplexity_before],
    ["perplexity after", m.perplexity_after],
    // the finer measure: how far the next-token distributions moved from the original's
    ["top-1 agreement", m.top1_agreement == null ? null : `${(100 * m.top1_agreement).toFixed(1)}%`],
    ["KL to the original", m.kl_divergence == null ? null : `${m.kl_divergence.toPrecision(3)} nats/token`],
    ["scored on", m.evaluation ? evalText(m.evaluation.source, m.evaluation.held_out) : null],
    ["size before", formatBytes(sizes.original_bytes)],
    ["size after", formatBytes(sizes.checkpoint_bytes)],
    ["mean module loss", m.loss_summary?.mean],
    ["worst module", m.loss_summary?.worst_module],
    ["duration", formatSeconds(m.duration_seconds)],
    ["attempts", job.attempts],
  ];
  return rows.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.append(text("td", k), text("td", typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(3)) : v));
    return tr;
  });
}

function renderJob(job) {
  $("#job-title").textContent = `${job.name || job.id} — ${job.model_id}`;
  setProgress($("#job-view .progress"), job);
  $("#job-view .progress").dataset.status = job.status;
  // a failed job's last progress message is its error: say it once, as the error
  $("#job-message").textContent = job.error ? "" : (job.progress?.message || "");
  $("#job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("#job-metrics tbody").replaceChildren(...metricRows(job));
  if (job.status === "succeeded") {
    reportLosses(job).then((mods) => { if (mods) drawLossChart($("#loss-chart"), mods); });
  } else {
    drawLossChart($("#loss-chart"), [...liveLosses.values()]);
  }
  const list = $("#artifacts");
  list.replaceChildren(...(job.artifacts || []).map((a) => {
    const li = document.createElement("li");
    const link = text("a", a.name);
    link.href = `/jobs/${job.id}/artifacts/${encodeURIComponent(a.name)}`;
    link.addEventListener("click", (e) => download(e, link.href, a.name));
    li.append(link, text("span", ` ${formatBytes(a.size)}`, "muted"));
    return li;
  }));
  if (job.status === "succeeded") {
    const li = document.createElement("li");
    const link = text("a", "whole checkpoint (.tar)");
    link.href = `/jobs/${job.id}/archive`;
    link.addEventListener("click", (e) => download(e, link.href, `${job.id}.tar`));
    li.append(link);
    list.append(li);
  }
  $("#downloads").hidden = list.children.length === 0;
  const samples = job.metrics?.evaluation?.samples_after || [];
  const skipped = job.metrics?.evaluation?.samples_skipped;  // a streamed run: why there are none
  $("#samples").replaceChildren(...samples.map((s) => text("pre", s)),
                                ...(skipped ? [text("p", `No samples: ${skipped}.`)] : []));
  $("#samples-panel").hidden = samples.length === 0 && !skipped;
  $("#verify").hidden = job.status !== "succeeded";
  $("#publish").hidden = job.status !== "succeeded";
  if (job.status === "succeeded") {
    $("#verify-button").onclick = () => verify(job.id);
    showVerifications(job.id).catch(() => { /* the panel stays empty */ });
    $("#publish-form").onsubmit = (e) => { e.preventDefault(); publish(job.id); };
    showPublications(job.id).catch(() => { /* the panel stays empty */ });
  }
  $("#cancel-button").hidden = !(job.status === "queued" || job.status === "running");
  $("#cancel-button").onclick = async () => { try { renderJob(await api(`/jobs/${job.id}/cancel`, { method: "POST" })); } catch (e) { $("#job-error").textContent = e.message; } };
}

// --- verifications of a succeeded job ---------------------------------------------------------
function verificationRow(v) {
  const result = v.result || {};
  const tr = document.createElement("tr");
  tr.className = "verification";
  tr.dataset.status = v.status;
  // a running one says how far it is, as a job does (stage, block i/n, ETA)
  const what = v.error ? `${v.error.code}: ${v.error.message}`
    : result.perplexity != null
      ? `perplexity ${result.perplexity.toFixed(3)} on ${evalText(result.eval_source, result.held_out)}`
      : v.status === "running" && v.progress
        ? `${progressLabel(v)} (${Math.round(100 * (v.progress.fraction || 0))}%)` : "";
  const td = text("td", what);
  for (const s of result.samples || []) td.append(text("pre", s.text));
  tr.append(text("td", `${v.status} (${age(v.created_at)})`, `status ${v.status}`), td);
  return tr;
}

async function showVerifications(jobId) {
  return showFollowUps(jobId, "verifications", verificationRow);
}

// --- publications of a succeeded job ---------------------------------------------------------
function publicationRow(p) {
  const result = p.result || {};
  const tr = document.createElement("tr");
  tr.className = "publication";
  tr.dataset.status = p.status;
  const td = document.createElement("td");
  if (result.url) {
    const link = text("a", `${p.spec.repo_id}${result.branch !== "main" ? ` (${result.branch})` : ""}`);
    link.href = result.url;  // the hub's page of the repository
    td.append(link, text("span", ` · ${result.files.length} files · commit ${result.commit.slice(0, 10)}`));
  } else {
    td.textContent = p.error ? `${p.spec.repo_id}: ${p.error.code}: ${p.error.message}`
      : p.status === "running" && p.progress
        ? `${p.spec.repo_id}: ${p.progress.message || p.progress.stage} (${Math.round(100 * (p.progress.fraction || 0))}%)`
        : p.spec.repo_id;
  }
  tr.append(text("td", `${p.status} (${age(p.created_at)})`, `status ${p.status}`), td);
  return tr;
}

async function showPublications(jobId) {
  return showFollowUps(jobId, "publications", publicationRow);
}

async function publish(jobId) {
  const form = $("#publish-form");
  const body = { repo_id: form.elements.repo_id.value.trim(), private: form.elements.private.checked };
  await startFollowUp(jobId, "publications", body, $("#publish-button"), showPublications);
}

// --- what verifications and publications share: a table of them, started from a button ------
async function showFollowUps(jobId, kind, row) {
  const body = await api(`/jobs/${jobId}/${kind}`);
  const items = Array.isArray(body) ? body : body.items; // a bare list or a page
  $(`#${kind} tbody`).replaceChildren(...items.map(row));
  return items;
}

async function startFollowUp(jobId, kind, body, button, show) {
  button.disabled = true;
  $("#job-error").textContent = "";
  try {
    await api(`/jobs/${jobId}/${kind}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    // poll until every one of the job has ended (the page may have moved on)
    while (location.hash === `#/jobs/${jobId}`) {
      const items = await show(jobId);
      if (items.every((v) => ["succeeded", "failed", "cancelled"].includes(v.status))) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
  } catch (e) {
    $("#job-error").textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

async function verify(jobId) {
  await startFollowUp(jobId, "verifications", {}, $("#verify-button"), showVerifications);
}

async function download(event, url, name) {
  // with an API key the browser cannot add the header to a plain link: fetch, then save
  if (!keyInput.value.trim()) return;
  event.preventDefault();
  const resp = await fetch(url, { headers: headers() });
  const blob = await resp.blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  URL.revokeObjectURL(a.href);
}

// --- routing --------------------------------------------------------------------------------
async function route() {
  stopFollowing();
  const match = location.hash.match(/^#\/jobs\/([\w-]+)/);
  $("#list-view").hidden = !!match;
  $("#job-view").hidden = !match;
  try {
    if (match) {
      liveLosses = new Map();
      const job = await api(`/jobs/${match[1]}`);
      renderJob(job);
      if (job.status === "queued" || job.status === "running") follow(job.id, renderJob, onJobEvent);
    } else {
      rows.clear();
      await Promise.all([loadJobs(), loadDatasets()]);
    }
  } catch (e) {
    (match ? $("#job-error") : $("#submit-error")).textContent = e.message;
  }
}

window.addEventListener("hashchange", route);
route();
