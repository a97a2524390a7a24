// scanside technologist console: the current exam's checklist, alerts and triage, kept live by
// server-sent events from /v1/events. Plain JS, no build step. Text is set with textContent only.
"use strict";

const STATUS = {
  done: { icon: "✓", word: "DONE" },
  pending: { icon: "…", word: "PENDING" },
  deviating: { icon: "⚠", word: "CHECK" },
};
const SEVERITY = { critical: "✖", warning: "⚠", info: "ℹ" };
const state = { exam: null, alerts: [], refreshTimer: null, source: null };

function $(id) { return document.getElementById(id); }

async function getJSON(url, options) {
  const resp = await fetch(url, Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {}));
  if (!resp.ok) throw new Error(url + ": HTTP " + resp.status);
  return resp.json();
}

function scheduleRefresh() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refresh(); }, 150);
}

async function refresh() {
  try {
    const [exam, unassigned, imageChecks] = await Promise.all([
      getJSON("/v1/exams/current"),
      getJSON("/v1/alerts?unassigned=true"),
      getJSON("/v1/image-checks").catch(() => null),
    ]);
    state.exam = exam;
    state.imageChecks = imageChecks ? imageChecks.detail : "";
    state.alerts = (exam ? exam.alerts : []).concat(unassigned);
    render();
  } catch (err) {
    console.warn("refresh failed", err);
  }
}

function render() {
  const exam = state.exam;
  const examEl = $("exam");
  if (exam) {
    const ended = exam.state === "completed" ? " — ENDED" : "";
    examEl.textContent = "Exam …" + exam.study_uid.slice(-6) + " · " + exam.n_series + " series" + ended;
  } else {
    examEl.textContent = "No exam yet";
  }
  renderChecklist(exam ? exam.checklist : []);
  renderAlerts(state.alerts);
  renderTriage(exam ? exam.triage_result : null);
  $("image-checks").textContent = state.imageChecks || "";
  $("image-checks").hidden = !state.imageChecks;
  $("done").hidden = !exam || exam.state === "completed";
}

function renderChecklist(items) {
  const list = $("checklist");
  list.replaceChildren();
  $("checklist-empty").hidden = items.length > 0;
  const tpl = $("item-tpl");
  for (const item of items) {
    const li = tpl.content.firstElementChild.cloneNode(true);
    const s = STATUS[item.status] || STATUS.pending;
    li.classList.add(item.status);
    li.dataset.key = item.key;
    li.dataset.status = item.status;
    li.querySelector(".icon").textContent = s.icon;
    li.querySelector(".status").textContent = s.word;
    li.querySelector(".title").textContent = item.title;
    li.querySelector(".series").textContent = item.series.length ? "series " + item.series.join(", ") : "";
    li.querySelector(".detail").textContent = item.detail || "";
    list.appendChild(li);
  }
}

function renderAlerts(alerts) {
  const list = $("alerts");
  list.replaceChildren();
  // unacknowledged first, most severe first, newest first
  const rank = { critical: 0, warning: 1, info: 2 };
  const sorted = alerts.slice().sort((a, b) =>
    (a.acknowledged - b.acknowledged) || (rank[a.severity] - rank[b.severity]) || ((b.seq || 0) - (a.seq || 0)));
  $("alerts-empty").hidden = sorted.length > 0;
  const tpl = $("alert-tpl");
  for (const a of sorted) {
    const li = tpl.content.firstElementChild.cloneNode(true);
    li.classList.add(a.severity);
    li.dataset.alertId = a.alert_id;
    li.dataset.code = a.code;
    li.querySelector(".icon").textContent = SEVERITY[a.severity] || "⚠";
    li.querySelector(".sev").textContent = a.severity;
    li.querySelector(".code").textContent = a.code + (a.series_number != null ? " · series " + a.series_number : "");
    li.querySelector(".msg").textContent = a.message;
    li.querySelector(".action").textContent = "→ " + a.action;
    const btn = li.querySelector(".btn-ack");
    const acked = li.querySelector(".acked");
    if (a.acknowledged) {
      li.classList.add("acknowledged");
      btn.remove();
      acked.textContent = "✓ Acknowledged" + (a.acknowledged_by ? " by " + a.acknowledged_by : "");
    } else {
      btn.addEventListener("click", () => acknowledge(a.alert_id, btn));
    }
    list.appendChild(li);
  }
}

function renderTriage(t) {
  const box = $("triage");
  // shadow mode (the model is still learning this site): recorded, not shown as advice
  if (!t || t.shadow) { box.hidden = true; return; }
  box.hidden = false;
  if (t.recommendation === "NOT_ASSESSED") {
    $("triage-rec").textContent = "? NOT ASSESSED";
    $("triage-prob").textContent = t.not_assessed_reason || "";
  } else {
    $("triage-rec").textContent = t.recommendation === "DCE_ADVISED" ? "⚠ DCE ADVISED" : "✓ bpMRI SUFFICIENT";
    $("triage-prob").textContent = "csPCa probability " + t.probability.toFixed(2) + " · " + t.findings.length + " finding(s)";
  }
  $("triage-note").textContent = t.disclaimer;
}

async function acknowledge(alertId, btn) {
  btn.disabled = true;
  btn.textContent = "Acknowledging…";
  try {
    await getJSON("/v1/alerts/" + encodeURIComponent(alertId) + "/ack", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
  } catch (err) {
    btn.disabled = false;
    btn.textContent = "Acknowledge (retry)";
  }
  scheduleRefresh();
}

async function examDone() {
  if (!state.exam) return;
  const btn = $("done");
  btn.disabled = true;
  try {
    await getJSON("/v1/exams/" + encodeURIComponent(state.exam.study_uid) + "/done", { method: "POST" });
  } finally {
    btn.disabled = false;
    scheduleRefresh();
  }
}

function setConnected(on) {
  const el = $("conn");
  el.className = "conn " + (on ? "conn-on" : "conn-off");
  el.querySelector(".icon").textContent = on ? "●" : "○";
  el.querySelector(".txt").textContent = on ? "LIVE" : "RECONNECTING";
}

function connect() {
  // EventSource resends Last-Event-ID on reconnect, so nothing is missed while it was away
  const source = new EventSource("/v1/events");
  state.source = source;
  source.onopen = () => { setConnected(true); scheduleRefresh(); };
  source.onerror = () => setConnected(false);
  const types = ["series_completed", "series_reopened", "file_quarantined", "protocol_deviation", "label_mismatch",
                 "series_classified", "triage_result", "exam_completed", "alert_acknowledged"];
  for (const t of types) source.addEventListener(t, scheduleRefresh);
  source.onmessage = scheduleRefresh;
}

$("done").addEventListener("click", examDone);
refresh();
connect();
