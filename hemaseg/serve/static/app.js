// The hemaseg page: upload a scan to /v1/segment, draw the reply, let the user adjust and download.
// Everything is served by hemaseg itself; the scan goes only to this server.
"use strict";

const PLAIN_ERRORS = {
  unsupported_type: "That file is not an image hemaseg can read (PNG, JPEG, BMP or TIFF).",
  file_too_large: "That file is too large for this service.",
  image_too_large: "That image has too many pixels for this service.",
  corrupt_image: "That image file is damaged or incomplete, so it cannot be read. Try exporting the scan again.",
  unsupported_mode: "That image uses a colour format hemaseg cannot convert. Save it as an ordinary grey or colour image.",
  empty_file: "That file is empty.",
  missing_file: "No file was sent. Choose a scan first.",
  unauthorized: "The service needs an access key. Type it in the Access key field and try again.",
  busy: "The service is busy right now. Try again in a moment.",
  invalid_parameter: "The service did not accept the settings.",
};

const $ = (id) => document.getElementById(id);
const state = { file: null, result: null, overlay: null, maskLayer: null, seq: 0, timer: null };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(code, detail) {
  const box = $("error");
  box.textContent = PLAIN_ERRORS[code] || "Something went wrong while segmenting the scan.";
  if (detail) {
    const small = document.createElement("span");
    small.className = "detail";
    small.textContent = detail;
    box.appendChild(small);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function errorFrom(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return { code: "http_" + response.status, message: "The service answered " + response.status + "." };
}

async function loadModel() {
  try {
    const r = await fetch("/v1/model", { headers: headers() });
    if (!r.ok) {
      const err = await errorFrom(r);
      $("model-line").textContent = err.code === "unauthorized"
        ? "Model details need the access key." : "Model details unavailable.";
      return;
    }
    const m = await r.json();
    const dice = m.metrics && typeof m.metrics.val_dice === "number"
      ? ` · validation Dice ${m.metrics.val_dice.toFixed(3)}` : "";
    $("model-line").textContent = `Model ${m.name} (hemaseg ${m.version || m.hemaseg_version})` +
      ` · input ${m.input_size} px${dice}`;
    if (!state.file) setThreshold(m.threshold);
  } catch (_) {
    $("model-line").textContent = "Could not reach the hemaseg service.";
  }
}

function setThreshold(value) {
  $("threshold").value = String(value);
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = src;
  });
}

function maskLayer(maskImg) {
  // Tint the white pixels of the 0/255 mask; everything else transparent.
  const c = document.createElement("canvas");
  c.width = maskImg.naturalWidth;
  c.height = maskImg.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(maskImg, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height);
  const d = px.data;
  for (let i = 0; i < d.length; i += 4) {
    const on = d[i] > 127;
    d[i] = 255; d[i + 1] = 140; d[i + 2] = 0; d[i + 3] = on ? 115 : 0;
  }
  ctx.putImageData(px, 0, 0);
  return c;
}

function draw() {
  if (!state.overlay) return;
  const canvas = $("canvas");
  canvas.width = state.overlay.naturalWidth;
  canvas.height = state.overlay.naturalHeight;
  // small scans are shown larger so the outline can be seen; large ones fit the panel
  canvas.style.width = Math.max(canvas.width, Math.min(512, canvas.width * 4)) + "px";
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.overlay, 0, 0);
  if ($("show-mask").checked && state.maskLayer) ctx.drawImage(state.maskLayer, 0, 0);
  canvas.hidden = false;
  $("legend").hidden = false;
  $("drop-zone").classList.add("has-image");
}

// The typed pixel spacing as the API takes it ("x" or "x,y" in mm). A decimal comma is read as one: "0,1" is
// 0.1 mm (a spacing of 0 is never meant), "0,1;0,12" or "0,1 0,12" are x and y; with a point, a comma
// separates x and y as before ("0.1,0.12").
function spacingParam(text) {
  const t = text.trim();
  if (!t || t.includes(".")) return t;
  const parts = t.split(/\s*[;\s]\s*/).filter(Boolean);
  if (parts.length <= 2 && parts.every((p) => /^\d*,?\d+$/.test(p))) {
    return parts.map((p) => p.replace(",", ".")).join(",");
  }
  return t;
}

// millimetres only when the scan (or the pixel-spacing field) gave a calibration; else pixels, and why
function showSize(m) {
  const sp = m.spacing;
  const mm = (v) => (v === null ? "–" : v.toFixed(1));
  if (m.n_lesions === 0) {
    $("size").textContent = "–";
  } else if (sp) {
    $("size").textContent = `${mm(m.longest_diameter_mm)} × ${mm(m.perpendicular_diameter_mm)} mm, ` +
      `area ${mm(m.total_area_mm2)} mm²`;
  } else {
    $("size").textContent = `${Math.round(m.longest_diameter_px)} × ${Math.round(m.perpendicular_diameter_px)} px`;
  }
  $("size").dataset.mm = sp ? String(m.longest_diameter_mm) : "";
  $("calibration").textContent = sp ? `(calibration: ${sp.source})` : (m.calibration_note ? `(${m.calibration_note})` : "");
}

function showResult(r) {
  const pct = (100 * r.area_fraction).toFixed(r.area_fraction < 0.001 && r.area_fraction > 0 ? 3 : 1);
  $("area-px").textContent = r.area_px.toLocaleString("en") + " px";
  $("area-px").dataset.value = String(r.area_px);
  $("area-pct").textContent = `(${pct} % of image)`;
  $("n-lesions").textContent = r.n_lesions === 0 ? "none found" : String(r.n_lesions);
  showSize(r.measurements);
  // an empty mask is a finding too: with weak evidence it says "no lesion found - review", never "100 %"
  $("confidence").textContent = `${r.finding} (confidence ${Math.round(100 * r.confidence)} %)`;
  $("confidence").title = r.review_reason;  // why it needs review (or not), on hover
  $("confidence").classList.toggle("review", r.needs_review);
  $("review-reason").textContent = r.needs_review ? `Needs review: ${r.review_reason}` : "";
  $("image-size").textContent = `${r.image.width} × ${r.image.height} px, ${r.image.format}`;
  $("latency").textContent = `${Math.round(r.latency_ms)} ms`;
  for (const [id, b64] of [["download-mask", r.mask_png], ["download-overlay", r.overlay_png]]) {
    const a = $(id);
    a.href = "data:image/png;base64," + b64;
    a.setAttribute("aria-disabled", "false");
  }
  $("result").dataset.state = "done";
  $("result").dataset.requestId = r.request_id;
}

async function segment() {
  if (!state.file) return;
  const seq = ++state.seq;  // a slower earlier reply must not overwrite a newer one
  clearError();
  $("result").dataset.state = "working";
  $("status").textContent = "Segmenting…";
  const form = new FormData();
  form.append("file", state.file);
  const threshold = Number($("threshold").value).toFixed(2);
  let response;
  try {
    const query = new URLSearchParams({ threshold });
    const spacing = spacingParam($("pixel-spacing").value);
    if (spacing) query.set("pixel_spacing", spacing);
    response = await fetch(`/v1/segment?${query}`, { method: "POST", body: form, headers: headers() });
  } catch (_) {
    if (seq !== state.seq) return;
    $("status").textContent = "";
    $("result").dataset.state = "error";
    showError("network", "Could not reach the hemaseg service. Check that it is running.");
    return;
  }
  if (seq !== state.seq) return;
  if (!response.ok) {
    const err = await errorFrom(response);
    if (seq !== state.seq) return;
    $("status").textContent = "";
    $("result").dataset.state = "error";
    $("size").textContent = "–";  // never an earlier scan's or setting's millimetres beside the error
    $("calibration").textContent = "";
    showError(err.code, err.message);
    return;
  }
  const r = await response.json();
  const [overlay, mask] = await Promise.all([
    loadImage("data:image/png;base64," + r.overlay_png),
    loadImage("data:image/png;base64," + r.mask_png),
  ]);
  if (seq !== state.seq) return;
  state.result = r;
  state.overlay = overlay;
  state.maskLayer = maskLayer(mask);
  draw();
  showResult(r);
  $("status").textContent = r.n_lesions === 0 ? "Done: no lesion found at this threshold." : "Done.";
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  segment();
}

function init() {
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    chooseFile(e.dataTransfer.files[0]);
  });
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
    clearTimeout(state.timer);
    state.timer = setTimeout(segment, 300);  // arrow keys and dragging settle before re-requesting
  });
  $("show-mask").addEventListener("change", draw);
  $("pixel-spacing").addEventListener("change", () => { if (state.file) segment(); });
  $("api-key").addEventListener("change", () => { loadModel(); if (state.file) segment(); });
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
