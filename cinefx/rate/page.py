"""The study page: one HTML file with its style and script inline, loading nothing but its media.

It knows trial ids, media names and questions, never which system made what. Answers are kept in
the browser's local storage (a reload resumes), posted after every answer when the page is served
by `cinefx rate --serve`, and downloadable as JSON at the end:

    {"format": "cinefx-rate-answers/1", "study": ID, "rater": NAME, "seq": N,
     "answers": {TRIAL: {QUESTION: "A" | "B" | "N"}}}      A: left, B: right, N: neither / same
"""

from __future__ import annotations

import json

ANSWERS_FORMAT = "cinefx-rate-answers/1"

_STYLE = """
:root { color-scheme: dark; --fg: #eee; --dim: #999; --accent: #e8b04a; }
body { margin: 0; background: #111; color: var(--fg); font: 16px/1.4 system-ui, sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 1rem; }
kbd { border: 1px solid #555; border-radius: 3px; padding: 0 .3em; font-size: .9em; }
#progress { display: flex; gap: 1rem; align-items: center; color: var(--dim); }
.bar { flex: 1; height: 6px; background: #333; border-radius: 3px; }
#done { height: 100%; background: var(--accent); border-radius: 3px; width: 0; }
.pair { display: flex; gap: .75rem; margin: .75rem 0; }
figure { flex: 1; margin: 0; background: #000; position: relative; }
figcaption { position: absolute; top: .3rem; left: .5rem; font-weight: bold; font-size: 1.4rem;
             text-shadow: 0 0 4px #000; z-index: 1; }
video, figure img { display: block; width: 100%; height: auto; max-height: 70vh; object-fit: contain; }
.broken { padding: 3rem 1rem; color: #f77; }
.q { padding: .4rem .6rem; border-left: 3px solid transparent; }
.q.current { border-left-color: var(--accent); background: #1c1c1c; }
.q p { margin: 0 0 .3rem; }
button { font: inherit; padding: .35rem .9rem; margin-right: .4rem; background: #2a2a2a; color: var(--fg);
         border: 1px solid #555; border-radius: 4px; cursor: pointer; }
button.chosen { background: var(--accent); color: #111; border-color: var(--accent); }
#status { color: var(--dim); font-size: .9em; }
"""

_SCRIPT = r"""
"use strict";
const S = JSON.parse(document.getElementById("study").textContent);
const $ = id => document.getElementById(id);
const served = location.protocol === "http:" || location.protocol === "https:";
const storeKey = "cinefx-rate-" + S.study;
const CHOICES = [["A", "A (left)"], ["N", "Neither / same"], ["B", "B (right)"]];
const KEYS = {a: "A", ArrowLeft: "A", b: "B", ArrowRight: "B", n: "N", ArrowDown: "N"};
const va = $("va"), vb = $("vb");
let st = null;
try { st = JSON.parse(localStorage.getItem(storeKey)); } catch (e) { st = null; }

function hex(n) {
  const a = new Uint8Array(n);
  crypto.getRandomValues(a);
  return Array.from(a, b => b.toString(16).padStart(2, "0")).join("");
}
function results() {
  return {format: "%ANSWERS_FORMAT%", study: S.study, rater: st.rater, seq: st.seq, answers: st.answers};
}
function save() {
  try { localStorage.setItem(storeKey, JSON.stringify(st)); } catch (e) { /* private mode: keep going */ }
  if (!served) return;
  fetch("answers", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(results())})
    .then(r => r.ok ? r.json() : r.text().then(t => Promise.reject(new Error(t))))
    .then(j => { if (j.seq === st.seq) $("status").textContent = `${j.saved} answers saved on the server`; })
    .catch(e => {
      $("status").textContent = `not saved on the server (${e.message}): download your answers at the end`;
    });
}
function start() {
  if ($("start").hidden) return;
  if (!st) {
    const name = $("name").value.trim().replace(/[^A-Za-z0-9_-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 32);
    st = {rater: (name ? name + "-" : "") + hex(4), answers: {}, trial: 0, q: 0, seq: 0};
  }
  $("start").hidden = true;
  $("status").textContent = served ? "answers are saved on the server as you go" : "download your answers at the end";
  show(st.trial);
}
function ready(v) {
  return new Promise(r => v.readyState >= 3 ? r() : v.addEventListener("canplay", r, {once: true}));
}
function playBoth() { for (const v of [va, vb]) v.play().catch(() => {}); }
function unload(v) { v.pause(); v.removeAttribute("src"); v.load(); }
function show(i) {
  st.trial = i;
  if (i >= S.trials.length) return finish();
  const t = S.trials[i];
  $("end").hidden = true;
  $("trial").hidden = false;
  $("count").textContent = `Pair ${i + 1} of ${S.trials.length}`;
  $("done").style.width = (100 * i / S.trials.length) + "%";
  for (const side of ["a", "b"]) {
    const v = $("v" + side), img = $("i" + side);
    $("x" + side).hidden = true;
    v.hidden = t.kind !== "video";
    img.hidden = t.kind !== "image";
    if (t.kind === "video") { v.src = t[side]; img.removeAttribute("src"); }
    else { unload(v); img.src = t[side]; }
  }
  if (t.kind === "video") Promise.all([ready(va), ready(vb)]).then(() => {
    if (st.trial !== i) return;
    va.currentTime = 0; vb.currentTime = 0; playBoth();
  });
  questions();
}
function questions() {
  const t = S.trials[st.trial], given = st.answers[t.id] || {}, box = $("questions");
  box.textContent = "";
  S.questions.forEach((q, j) => {
    const row = document.createElement("div"), p = document.createElement("p");
    row.className = "q" + (j === st.q ? " current" : "");
    p.textContent = (S.questions.length > 1 ? `${j + 1}. ` : "") + q.text;
    row.append(p);
    for (const [value, label] of CHOICES) {
      const b = document.createElement("button");
      b.textContent = label; b.dataset.question = q.id; b.dataset.answer = value;
      if (given[q.id] === value) b.className = "chosen";
      b.addEventListener("click", () => { b.blur(); answer(j, value); });
      row.append(b);
    }
    box.append(row);
  });
}
function answer(j, value) {
  const t = S.trials[st.trial];
  (st.answers[t.id] = st.answers[t.id] || {})[S.questions[j].id] = value;
  st.seq += 1;
  const open = S.questions.findIndex(q => !(q.id in st.answers[t.id]));
  if (open >= 0) { st.q = open; save(); questions(); }
  else { st.q = 0; st.trial += 1; save(); show(st.trial); }
}
function back() {
  if (!$("trial").hidden && st.q > 0) { st.q -= 1; questions(); return; }
  if (st.trial > 0) { st.q = S.questions.length - 1; show(st.trial - 1); }
}
function finish() {
  $("trial").hidden = true;
  unload(va); unload(vb);
  const n = Object.values(st.answers).reduce((s, a) => s + Object.keys(a).length, 0);
  $("summary").textContent = `You gave ${n} answers on ${S.trials.length} pairs.`;
  $("end").hidden = false;
}
function download() {
  const blob = new Blob([JSON.stringify(results(), null, 1)], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `answers-${S.study}-${st.rater}.json`;
  document.body.append(a); a.click(); a.remove();
}
for (const side of ["a", "b"]) $("v" + side).addEventListener("error", ev => {
  const v = ev.target;
  if (!v.getAttribute("src")) return;
  $("x" + side).hidden = false;
  const why = v.error ? v.error.message || `media error ${v.error.code}` : "unknown error";
  console.error(`clip ${side.toUpperCase()} cannot be played here: ${why}`);
});
setInterval(() => {  // keep B on A's clock: both loop, and decoders drift apart
  if (va.paused || vb.paused || va.readyState < 2 || vb.readyState < 2) return;
  if (Math.abs(va.currentTime - vb.currentTime) > 0.1) vb.currentTime = Math.min(va.currentTime, vb.duration || 0);
}, 250);
document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (!$("start").hidden) { if (e.key === "Enter") { e.preventDefault(); start(); } return; }
  const k = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  if (k === "Backspace" || k === "ArrowUp") { e.preventDefault(); back(); }
  else if ($("trial").hidden) return;
  else if (k in KEYS) { e.preventDefault(); answer(st.q, KEYS[k]); }
  else if (k === " ") { e.preventDefault(); if (va.paused) playBoth(); else { va.pause(); vb.pause(); } }
});
$("begin").addEventListener("click", start);
$("download").addEventListener("click", download);
$("total").textContent = S.trials.length;
$("qlist").append(...S.questions.map(q => Object.assign(document.createElement("li"), {textContent: q.text})));
if (st) start();
"""

_BODY = """<main>
<section id="start">
  <h1>Pairwise preference study</h1>
  <p>You will see <span id="total"></span> pairs side by side: <b>A</b> on the left, <b>B</b> on the right.
     Clips play together and loop. For each pair, answer:</p>
  <ol id="qlist"></ol>
  <p>Keys: <kbd>A</kbd> or <kbd>&larr;</kbd> for A, <kbd>B</kbd> or <kbd>&rarr;</kbd> for B,
     <kbd>N</kbd> or <kbd>&darr;</kbd> for neither / the same; <kbd>Backspace</kbd> or <kbd>&uarr;</kbd>
     goes back; <kbd>Space</kbd> pauses.</p>
  <p><label>Your name or initials (optional): <input id="name" maxlength="32" autocomplete="off"></label></p>
  <button id="begin">Start (Enter)</button>
</section>
<section id="trial" hidden>
  <div id="progress"><span id="count"></span><div class="bar"><div id="done"></div></div></div>
  <div class="pair">
    <figure><figcaption>A</figcaption><video id="va" muted loop playsinline preload="auto"></video>
      <img id="ia" alt="A" hidden>
      <div id="xa" class="broken" hidden>This clip cannot be played in this browser.</div></figure>
    <figure><figcaption>B</figcaption><video id="vb" muted loop playsinline preload="auto"></video>
      <img id="ib" alt="B" hidden>
      <div id="xb" class="broken" hidden>This clip cannot be played in this browser.</div></figure>
  </div>
  <div id="questions"></div>
</section>
<section id="end" hidden>
  <h1>Thank you</h1>
  <p id="summary"></p>
  <button id="download">Download your answers</button>
  <p>Changed your mind? <kbd>Backspace</kbd> goes back.</p>
</section>
<p id="status"></p>
</main>"""


def page_html(public: dict) -> str:
    """The page for `public` (study id, questions, trials with their media), as one string."""
    data = json.dumps(public, separators=(",", ":")).replace("<", "\\u003c")  # no `</script>` inside
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>Pairwise preference study</title><link rel=\"icon\" href=\"data:,\">"
            f"<style>{_STYLE}</style></head>\n<body>\n{_BODY}\n"
            f"<script type=\"application/json\" id=\"study\">{data}</script>\n"
            f"<script>{_SCRIPT.replace('%ANSWERS_FORMAT%', ANSWERS_FORMAT)}</script>\n</body></html>\n")
