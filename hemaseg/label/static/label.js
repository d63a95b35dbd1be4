// The hemaseg labelling page: the worklist, a canvas to correct the model's outline, save, fine-tune.
// Everything is served by hemaseg itself; scans and masks go only to this server.
// Masks are Uint8Array(W * H), 1 = lesion, row-major; they travel as RLE (app.py's docstring).
"use strict";

const $ = (id) => document.getElementById(id);
const ZOOMS = [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16];
const MAX_CANVAS = 8192;  // px per side of the drawn canvas
const MAX_UNDO = 100;

const S = {
  items: [], index: -1, name: null, info: null, W: 0, H: 0, img: null,
  mask: null, maskCanvas: document.createElement("canvas"), proposal: null,
  box: null, points: [], origin: "none", edited: false, savedMethod: null,
  tool: "box", brush: 4, zoom: 1, undo: [], redo: [], drafts: new Map(),
  opened: 0, drag: null, hover: null, maskVersion: 0, seq: 0,
  finetuneTimer: null, worklistTimer: null,
};

// --- server ---------------------------------------------------------------------------------------

function headers(extra) {
  const key = $("api-key").value.trim();
  return Object.assign(key ? { "X-API-Key": key } : {}, extra || {});
}

async function errorFrom(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return { code: "http_" + response.status, message: "The server answered " + response.status + "." };
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  let r;
  try {
    r = await fetch(path, opts);
  } catch (_) {
    throw { code: "network", message: "Could not reach the hemaseg label server. Check that it is running." };
  }
  if (!r.ok) throw await errorFrom(r);
  return r;
}

const json = async (path, options) => (await api(path, options)).json();
const post = (path, body) => json(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(body || {}) });
const scanPath = (name, tail) => "/api/scans/" + encodeURIComponent(name) + (tail ? "/" + tail : "");

function showError(err) {
  const box = $("error");
  box.textContent = (err && err.message) || String(err);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function status(text) { $("status").textContent = text; }

async function blobImage(path) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  try {
    return await new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject({ message: "The image could not be shown." });
      img.src = url;
    });
  } finally {
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }
}

// --- masks ----------------------------------------------------------------------------------------

function rleEncode(mask) {
  const counts = [];
  let current = 0, run = 0;
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] ? 1 : 0;
    if (v !== current) { counts.push(run); run = 0; current = v; }
    run++;
  }
  counts.push(run);
  return { height: S.H, width: S.W, counts };
}

function rleDecode(rle) {
  const mask = new Uint8Array(rle.width * rle.height);
  let at = 0;
  rle.counts.forEach((n, i) => { if (i % 2) mask.fill(1, at, at + n); at += n; });
  return mask;
}

function maskFromImage(img) {
  const c = document.createElement("canvas");
  c.width = S.W; c.height = S.H;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, S.W, S.H).data;
  const mask = new Uint8Array(S.W * S.H);
  for (let i = 0; i < mask.length; i++) mask[i] = d[4 * i] > 127 ? 1 : 0;
  return mask;
}

function maskArea() {
  let n = 0;
  for (let i = 0; i < S.mask.length; i++) n += S.mask[i];
  return n;
}

function paintLayer() {
  const c = S.maskCanvas;
  if (c.width !== S.W || c.height !== S.H) { c.width = S.W; c.height = S.H; }
  const ctx = c.getContext("2d");
  const px = ctx.createImageData(S.W, S.H);
  const d = px.data;
  for (let i = 0; i < S.mask.length; i++) {
    if (!S.mask[i]) continue;
    d[4 * i] = 255; d[4 * i + 1] = 140; d[4 * i + 2] = 0; d[4 * i + 3] = 110;
  }
  ctx.putImageData(px, 0, 0);
}

function maskChanged() {
  S.maskVersion++;
  paintLayer();
  const area = maskArea();
  $("mask-area").textContent = area.toLocaleString("en") + " px";
  $("mask-area").dataset.value = String(area);
  $("mask-area").dataset.version = String(S.maskVersion);
  $("mask-origin").textContent = S.edited ? "(edited)" : ({ proposal: "(model's outline)", box: "(from the box)",
    saved: "(as saved)", none: "" }[S.origin] || "");
  render();
}

// every change that undo can take back goes through here first
function snapshot() {
  return { mask: S.mask.slice(), box: S.box && S.box.slice(), points: S.points.map((p) => p.slice()),
           origin: S.origin, edited: S.edited };
}

function restore(snap) {
  S.mask = snap.mask; S.box = snap.box; S.points = snap.points; S.origin = snap.origin; S.edited = snap.edited;
  maskChanged();
}

function pushUndo() {
  S.undo.push(snapshot());
  if (S.undo.length > MAX_UNDO) S.undo.shift();
  S.redo = [];
}

function undo() {
  if (!S.undo.length) return;
  S.redo.push(snapshot());
  restore(S.undo.pop());
  status("Undone.");
}

function redo() {
  if (!S.redo.length) return;
  S.undo.push(snapshot());
  restore(S.redo.pop());
  status("Redone.");
}

// --- drawing ----------------------------------------------------------------------------------------

function render() {
  if (!S.img) return;
  const c = $("canvas");
  const z = S.zoom;
  const w = Math.round(S.W * z), h = Math.round(S.H * z);
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  c.dataset.zoom = String(z);
  c.dataset.width = String(S.W);
  c.dataset.height = String(S.H);
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = z < 1;
  ctx.clearRect(0, 0, w, h);
  ctx.drawImage(S.img, 0, 0, w, h);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(S.maskCanvas, 0, 0, w, h);
  if ($("show-outline").checked && S.proposal && S.proposal.available) {
    ctx.strokeStyle = "#ffd700";
    ctx.lineWidth = Math.max(1.5, z * 0.35);
    for (const outline of S.proposal.outlines) {
      ctx.beginPath();
      outline.forEach(([x, y], i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, (x + 0.5) * z, (y + 0.5) * z));
      ctx.closePath();
      ctx.stroke();
    }
  }
  const box = S.drag && S.drag.kind === "box" ? S.drag.box : S.box;
  if (box) {
    ctx.save();
    ctx.strokeStyle = "#3fd3ff";
    ctx.setLineDash([6, 4]);
    ctx.lineWidth = 2;
    ctx.strokeRect(box[0] * z, box[1] * z, (box[2] - box[0] + 1) * z, (box[3] - box[1] + 1) * z);
    ctx.restore();
  }
  for (const [x, y, label] of S.points) {
    ctx.beginPath();
    ctx.arc((x + 0.5) * z, (y + 0.5) * z, Math.max(4, z), 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#22c55e" : "#ef4444";
    ctx.fill();
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1.5;
    ctx.stroke();
  }
  if (S.hover && (S.tool === "brush" || S.tool === "erase")) {
    ctx.beginPath();
    ctx.arc((S.hover[0] + 0.5) * z, (S.hover[1] + 0.5) * z, (S.brush + 0.5) * z, 0, 2 * Math.PI);
    ctx.strokeStyle = S.tool === "erase" ? "#ef4444" : "#ffffff";
    ctx.lineWidth = 1;
    ctx.stroke();
  }
}

function setZoom(z) {
  const most = Math.min(MAX_CANVAS / S.W, MAX_CANVAS / S.H);
  S.zoom = Math.max(0.05, Math.min(z, most));
  $("zoom-value").textContent = Math.round(S.zoom * 100) + " %";
  render();
}

function fitZoom() {
  const v = $("viewport");
  const z = Math.min((v.clientWidth - 8) / S.W, (v.clientHeight - 8) / S.H);
  const level = ZOOMS.filter((l) => l <= z).pop() || Math.max(z, 0.05);  // a whole level: pixels stay square
  setZoom(level);
}

function zoomStep(dir) {
  const next = dir > 0 ? ZOOMS.find((l) => l > S.zoom + 1e-9) : ZOOMS.filter((l) => l < S.zoom - 1e-9).pop();
  if (next) setZoom(next);
}

// the scan pixel under the mouse, whatever the zoom and scroll
function pixelAt(e) {
  const r = $("canvas").getBoundingClientRect();
  const x = Math.floor(((e.clientX - r.left) / r.width) * S.W);
  const y = Math.floor(((e.clientY - r.top) / r.height) * S.H);
  return [Math.max(0, Math.min(S.W - 1, x)), Math.max(0, Math.min(S.H - 1, y))];
}

function dab(cx, cy, value) {
  const r = S.brush, r2 = r * r;
  for (let y = Math.max(0, cy - r); y <= Math.min(S.H - 1, cy + r); y++) {
    for (let x = Math.max(0, cx - r); x <= Math.min(S.W - 1, cx + r); x++) {
      if ((x - cx) * (x - cx) + (y - cy) * (y - cy) <= r2) S.mask[y * S.W + x] = value;
    }
  }
}

function strokeTo(from, to, value) {
  const steps = Math.max(1, Math.ceil(Math.hypot(to[0] - from[0], to[1] - from[1]) / Math.max(1, S.brush / 2)));
  for (let i = 1; i <= steps; i++) {
    dab(Math.round(from[0] + ((to[0] - from[0]) * i) / steps), Math.round(from[1] + ((to[1] - from[1]) * i) / steps), value);
  }
}

// --- tools ------------------------------------------------------------------------------------------

function setTool(tool) {
  S.tool = tool;
  for (const b of document.querySelectorAll(".tool")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
  render();
}

function setBrush(r) {
  S.brush = Math.max(1, Math.min(40, r));
  $("brush").value = String(S.brush);
  $("brush-value").textContent = String(S.brush);
  render();
}

function accept() {
  if (!S.proposal || !S.proposal.available) { status("No outline from a model to accept on this scan."); return; }
  pushUndo();
  S.mask = rleDecode(S.proposal.mask_rle);
  S.origin = "proposal"; S.edited = false;
  maskChanged();
  status("The model's outline is now the mask.");
}

function clearMask() {
  pushUndo();
  S.mask = new Uint8Array(S.W * S.H);
  S.box = null; S.points = []; S.edited = true;
  maskChanged();
}

async function prompt() {
  const seq = ++S.seq;
  const body = {};
  if (S.box) body.box = S.box;
  if (S.points.length) {
    body.points = S.points.map(([x, y]) => [x, y]);
    body.point_labels = S.points.map((p) => p[2]);
  }
  if (!body.box && !body.points) return;
  status("Outlining…");
  clearError();
  try {
    const r = await post(scanPath(S.name, "box"), body);
    if (seq !== S.seq) return;
    S.mask = rleDecode(r.mask_rle);
    S.origin = "box"; S.edited = false;
    maskChanged();
    status(`Outlined from the ${S.box ? "box" : "points"} (${r.area_px.toLocaleString("en")} px).`);
  } catch (err) {
    if (seq === S.seq) { status(""); showError(err); }
  }
}

function onPointerDown(e) {
  if (!S.mask) return;
  e.preventDefault();
  $("canvas").setPointerCapture(e.pointerId);
  const p = pixelAt(e);
  const secondary = e.button === 2 || e.shiftKey;
  if (S.tool === "box") {
    S.drag = { kind: "box", start: p, box: [p[0], p[1], p[0], p[1]] };
  } else if (S.tool === "points") {
    pushUndo();
    S.points.push([p[0], p[1], secondary ? 0 : 1]);
    render();
    prompt();
  } else {
    pushUndo();
    const value = S.tool === "erase" || secondary ? 0 : 1;
    S.drag = { kind: "brush", last: p, value };
    dab(p[0], p[1], value);
    S.edited = true;
    maskChanged();
  }
}

function onPointerMove(e) {
  if (!S.mask) return;
  const p = pixelAt(e);
  S.hover = p;
  if (S.drag && S.drag.kind === "box") {
    const s = S.drag.start;
    S.drag.box = [Math.min(s[0], p[0]), Math.min(s[1], p[1]), Math.max(s[0], p[0]), Math.max(s[1], p[1])];
    render();
  } else if (S.drag && S.drag.kind === "brush") {
    strokeTo(S.drag.last, p, S.drag.value);
    S.drag.last = p;
    maskChanged();
  } else {
    render();
  }
}

function onPointerUp() {
  const drag = S.drag;
  S.drag = null;
  if (!drag || drag.kind !== "box") return;
  const b = drag.box;
  if (b[2] - b[0] < 2 || b[3] - b[1] < 2) { render(); return; }  // a click, not a box
  pushUndo();
  S.box = b;
  render();
  prompt();
}

// --- scans ------------------------------------------------------------------------------------------

function keepDraft() {
  if (S.name && S.mask && (S.edited || S.origin !== "saved")) {
    S.drafts.set(S.name, { snap: snapshot(), undo: S.undo, redo: S.redo });
  }
}

async function openScan(index) {
  if (index < 0 || index >= S.items.length) return;
  keepDraft();
  const name = S.items[index].name;
  const seq = ++S.seq;
  S.index = index;
  clearError();
  status("Opening " + name + "…");
  try {
    const [info, img, proposal] = await Promise.all([
      json(scanPath(name)), blobImage(scanPath(name, "image")), json(scanPath(name, "proposal"))]);
    let savedMask = null;
    if (info.saved) savedMask = await blobImage(scanPath(name, "mask"));
    if (seq !== S.seq) return;
    Object.assign(S, { name, info, img, W: info.width, H: info.height, proposal, box: null, points: [],
                       undo: [], redo: [], opened: performance.now() });
    const draft = S.drafts.get(name);
    if (draft) {
      restore(draft.snap);
      S.undo = draft.undo; S.redo = draft.redo;
    } else if (savedMask) {
      S.mask = maskFromImage(savedMask);
      S.origin = "saved"; S.edited = false;
    } else {
      S.mask = new Uint8Array(S.W * S.H);
      S.origin = "none"; S.edited = false;
    }
    S.savedMethod = info.saved ? info.saved.method : null;
    showScan();
    fitZoom();
    maskChanged();
    $("canvas").dataset.name = name;
    status(info.saved ? `Saved before (${info.saved.method || "?"}): its mask is shown.` : "");
    api(scanPath(name, "prepare"), { method: "POST" }).catch(() => {});  // LiteMedSAM embeds it meanwhile
  } catch (err) {
    if (seq === S.seq) { status(""); showError(err); }
  }
}

function showScan() {
  const info = S.info, p = S.proposal;
  $("scan-name").textContent = S.name;
  $("scan-size").textContent = `${info.width} × ${info.height} px, ${info.format}`;
  const finding = $("finding");
  if (p && p.available) {
    finding.textContent = `${p.finding} (confidence ${Math.round(100 * p.confidence)} %)`;
    finding.classList.toggle("review", p.needs_review);
  } else {
    finding.textContent = p && p.reason ? `no outline: ${p.reason}` : "no outline";
    finding.classList.remove("review");
  }
  $("saved-state").textContent = info.saved ? `yes (${info.saved.method || "?"})` : "no";
  $("burned-in").hidden = info.burned_in_annotation !== true;
  const field = $("pixel-spacing");
  if (info.spacing) {
    const sp = info.spacing;
    field.value = sp.x_mm === sp.y_mm ? fmt(sp.x_mm) : `${fmt(sp.x_mm)};${fmt(sp.y_mm)}`;
    field.readOnly = true;
    $("spacing-source").textContent = `from the file: ${sp.source}`;
  } else {
    if (field.readOnly) field.value = "";  // a DICOM's figure does not carry over to the next scan
    field.readOnly = false;
    $("spacing-source").textContent = info.spacing_note ? `Not from the file: ${info.spacing_note}. Type it.`
      : "Type the spacing; it is kept for the next scans.";
  }
  markCurrent();
}

function fmt(v) { return String(Math.round(v * 1e6) / 1e6); }

// how the mask was made, and what it started from: the manifest's method and the model it credits
function method() {
  if (S.edited) return ["edited", S.origin === "proposal" || S.origin === "box" ? S.origin : "none"];
  if (S.origin === "proposal") return ["accepted", "proposal"];
  if (S.origin === "box") return ["box", "box"];
  if (S.origin === "saved" && S.savedMethod) return [S.savedMethod, ({ accepted: "proposal", box: "box" })[S.savedMethod] || "none"];
  return ["edited", "none"];
}

async function save() {
  if (!S.mask) return;
  const [how, base] = method();
  const field = $("pixel-spacing");
  const body = { mask_rle: rleEncode(S.mask), method: how, base,
                 seconds: Math.round((performance.now() - S.opened) / 100) / 10,
                 pixel_spacing: field.readOnly ? null : field.value.trim() || null };
  clearError();
  status("Saving…");
  try {
    const r = await post(scanPath(S.name, "save"), body);
    S.drafts.delete(S.name);
    S.origin = "saved"; S.edited = false; S.savedMethod = how;
    S.info.saved = r.saved.row;
    $("saved-state").textContent = `yes (${how})`;
    const item = S.items.find((it) => it.name === S.name);
    if (item) { item.saved = true; item.method = how; }
    showProgress(r.labelled, r.total, r.progress);
    renderWorklist();
    status(`Saved ${r.saved.image} and ${r.saved.mask} (${r.saved.area_px.toLocaleString("en")} px, ${how}).`);
    $("save").dataset.saved = S.name;
  } catch (err) {
    status("");
    showError(err);
  }
}

// --- worklist ---------------------------------------------------------------------------------------

function showProgress(done, total, text) {
  $("progress-text").textContent = text;
  $("progress").max = Math.max(1, total);
  $("progress").value = done;
}

function badge(it) {
  if (it.problem) return ["unreadable", "review"];
  if (!it.has_proposal) return ["no outline", ""];
  const pct = Math.round(100 * it.confidence) + " %";
  return it.needs_review ? ["review · " + pct, "review"] : [pct, ""];
}

function renderWorklist() {
  const list = $("worklist");
  list.textContent = "";
  S.items.forEach((it, i) => {
    const li = document.createElement("li");
    li.dataset.name = it.name;
    li.dataset.saved = String(it.saved);
    li.classList.toggle("saved", it.saved);
    li.classList.toggle("current", it.name === S.name);
    const b = document.createElement("button");
    b.type = "button";
    b.tabIndex = -1;  // the list is clicked; the keyboard uses N / Shift+N
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = it.name;
    const [text, cls] = badge(it);
    const tag = document.createElement("span");
    tag.className = "badge " + cls;
    tag.textContent = it.saved ? `${text} · saved` : text;
    b.append(name, tag);
    b.addEventListener("click", () => openScan(i));
    li.append(b);
    list.append(li);
  });
}

function markCurrent() {
  for (const li of $("worklist").children) li.classList.toggle("current", li.dataset.name === S.name);
}

async function loadWorklist(openFirst) {
  try {
    const w = await json("/api/worklist");
    S.items = w.items;
    if (S.name) S.index = Math.max(0, S.items.findIndex((it) => it.name === S.name));
    renderWorklist();
    showProgress(w.labelled, w.total, w.progress);
    const box = w.box.state === "ready" ? `boxes by ${w.box.model}` : w.box.state === "loading"
      ? "LiteMedSAM loading…" : "boxes off" + (w.box.problem ? ` (${w.box.problem})` : "");
    $("model-line").textContent = `Outlines by ${w.model || "no model"} · ${box}`;
    $("model-line").dataset.model = w.model || "";
    $("scoring").textContent = w.scoring.idle ? "" : `model scoring ${w.scoring.done} of ${w.scoring.total}…`;
    $("worklist").dataset.ready = String(w.scoring.idle);
    if (w.finetune.state === "running" && !S.finetuneTimer) pollFinetune();
    clearTimeout(S.worklistTimer);
    if (!w.scoring.idle || w.box.state === "loading") S.worklistTimer = setTimeout(() => loadWorklist(false), 2000);
    if (openFirst && S.items.length) await openScan(0);
  } catch (err) {
    showError(err);
    $("progress-text").textContent = err.code === "unauthorized" ? "Type the access key." : "Worklist unavailable.";
  }
}

// --- fine-tune --------------------------------------------------------------------------------------

async function startFinetune() {
  clearError();
  try {
    await post("/api/finetune");
    $("finetune-result").hidden = true;
    pollFinetune();
  } catch (err) {
    showError(err);
  }
}

async function pollFinetune() {
  clearTimeout(S.finetuneTimer);
  let st;
  try {
    st = await json("/api/finetune");
  } catch (err) {
    showError(err);
    S.finetuneTimer = null;
    return;
  }
  const bar = $("finetune-progress");
  bar.hidden = false;
  bar.value = st.progress || 0;
  $("finetune").disabled = st.state === "running";
  $("finetune-status").textContent = st.state === "running" ? `${st.phase || ""} · ${st.message || ""}` : st.message || "";
  $("finetune-status").dataset.state = st.state;
  if (st.state === "running") {
    S.finetuneTimer = setTimeout(pollFinetune, 700);
    return;
  }
  S.finetuneTimer = null;
  if (st.state === "done" && st.result) {
    const r = st.result;
    const d = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3));
    const result = $("finetune-result");
    result.textContent = `Dice on ${r.n_holdout} held-out scan${r.n_holdout === 1 ? "" : "s"} ` +
      `(trained on ${r.n_train}): before ${d(r.dice_old)} → after ${d(r.dice_new)}. ` +
      (r.swapped ? `${r.new_model} now outlines the remaining scans.` : "The old model stays.");
    result.dataset.swapped = String(r.swapped);
    result.hidden = false;
    await loadWorklist(false);
    if (r.swapped && S.name && !(S.info && S.info.saved)) {
      S.proposal = await json(scanPath(S.name, "proposal"));
      showScan();
      render();
    }
  }
}

// --- keys and wiring --------------------------------------------------------------------------------

function onKey(e) {
  const t = e.target;
  if (t && (t.tagName === "INPUT" && (t.type === "text" || t.type === "password"))) {
    if (e.key === "Enter" || e.key === "Escape") t.blur();
    return;
  }
  const k = e.key, ctrl = e.ctrlKey || e.metaKey;
  const act = (fn) => { e.preventDefault(); fn(); };
  if (ctrl && (k === "z" || k === "Z")) return act(e.shiftKey ? redo : undo);
  if (ctrl && (k === "y" || k === "Y")) return act(redo);
  if (ctrl && (k === "s" || k === "S")) return act(save);
  if (ctrl || e.altKey) return;
  switch (k) {
    case "a": case "A": return act(accept);
    case "b": case "B": return act(() => setTool("box"));
    case "p": case "P": return act(() => setTool("points"));
    case "d": case "D": return act(() => setTool("brush"));
    case "e": case "E": return act(() => setTool("erase"));
    case "[": return act(() => setBrush(S.brush - 1));
    case "]": return act(() => setBrush(S.brush + 1));
    case "+": case "=": return act(() => zoomStep(1));
    case "-": case "_": return act(() => zoomStep(-1));
    case "0": return act(fitZoom);
    case "x": case "X": return act(clearMask);
    case "o": case "O": return act(() => { $("show-outline").checked = !$("show-outline").checked; render(); });
    case "s": case "S": return act(save);
    case "n": return act(() => openScan(S.index + 1));
    case "N": return act(() => openScan(S.index - 1));
    case "t": case "T": return act(startFinetune);
    default: return undefined;
  }
}

function init() {
  const c = $("canvas");
  c.addEventListener("pointerdown", onPointerDown);
  c.addEventListener("pointermove", onPointerMove);
  c.addEventListener("pointerup", onPointerUp);
  c.addEventListener("pointercancel", onPointerUp);
  c.addEventListener("pointerleave", () => { S.hover = null; render(); });
  c.addEventListener("contextmenu", (e) => e.preventDefault());  // right button: remove point / erase
  $("viewport").addEventListener("wheel", (e) => {
    if (!e.ctrlKey) return;
    e.preventDefault();
    zoomStep(e.deltaY < 0 ? 1 : -1);
  }, { passive: false });
  for (const b of document.querySelectorAll(".tool")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("accept").addEventListener("click", accept);
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", clearMask);
  $("zoom-in").addEventListener("click", () => zoomStep(1));
  $("zoom-out").addEventListener("click", () => zoomStep(-1));
  $("zoom-fit").addEventListener("click", fitZoom);
  $("show-outline").addEventListener("change", render);
  $("brush").addEventListener("input", () => setBrush(Number($("brush").value)));
  $("save").addEventListener("click", save);
  $("next").addEventListener("click", () => openScan(S.index + 1));
  $("prev").addEventListener("click", () => openScan(S.index - 1));
  $("finetune").addEventListener("click", startFinetune);
  $("api-key").addEventListener("change", () => loadWorklist(!S.name));
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", () => { if (S.img) render(); });
  loadWorklist(true);
}

document.addEventListener("DOMContentLoaded", init);
