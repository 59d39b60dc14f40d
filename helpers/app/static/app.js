// The search page: query by image (picker, drop, paste), by text, or by a click on a result; no external resource.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, results: [], selected: -1, viewing: -1, lastQuery: null, busy: false };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

function currentK() {
  const input = $("k");
  const k = Number(input.value);
  const max = state.info ? state.info.max_k : 200;
  if (!Number.isInteger(k) || k < 1 || k > max) {
    throw new Error(`k must be a whole number from 1 to ${max}`);
  }
  return k;
}

async function callSearch(body, headers) {
  const started = performance.now();
  let response;
  try {
    response = await fetch("/api/search", { method: "POST", body, headers });
  } catch (err) {
    throw new Error(`the server did not answer (${err.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = { error: `the server answered ${response.status} without JSON` };
  }
  if (!response.ok) {
    throw new Error(data.error || `the server answered ${response.status}`);
  }
  data.roundTripMs = performance.now() - started;
  return data;
}

function showQuery(query) {
  const preview = $("query-preview");
  const image = $("query-image");
  preview.hidden = false;
  if (query.kind === "image" && query.file) {
    if (image.dataset.url) URL.revokeObjectURL(image.dataset.url);
    image.dataset.url = URL.createObjectURL(query.file);
    image.src = image.dataset.url;
    image.hidden = false;
    $("query-label").textContent = `query: ${query.file.name || "pasted image"}`;
  } else if (query.kind === "id") {
    image.src = `/thumb/${query.id}`;
    image.hidden = false;
    $("query-label").textContent = `more like: ${query.name}`;
  } else {
    image.hidden = true;
    $("query-label").textContent = `query: \u201c${query.text}\u201d`;
  }
}

async function runQuery(query) {
  if (state.busy) return;
  showError("");
  let k;
  try {
    k = currentK();
  } catch (err) {
    showError(err.message);
    return;
  }
  let body;
  let headers = {};
  if (query.kind === "image") {
    const limit = state.info ? state.info.max_upload_mb : Infinity;
    if (query.file.size > limit * 1048576) {
      showError(`the image is over the limit of ${limit} MB`);
      return;
    }
    body = new FormData();
    body.append("image", query.file, query.file.name || "pasted-image");
    body.append("k", String(k));
  } else {
    body = JSON.stringify(query.kind === "text" ? { text: query.text, k } : { id: query.id, k });
    headers = { "Content-Type": "application/json" };
  }
  state.busy = true;
  document.body.classList.add("busy");
  setStatus("searching\u2026");
  try {
    const data = await callSearch(body, headers);
    state.lastQuery = query;
    showQuery(query);
    renderResults(data.results);
    setStatus(`${data.results.length} results in ${data.time_ms.toFixed(0)} ms ` +
              `(${data.roundTripMs.toFixed(0)} ms with the network)`);
  } catch (err) {
    showError(err.message);
    setStatus("");
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
  }
}

function card(result, position) {
  const item = document.createElement("li");
  item.className = "card";
  item.tabIndex = 0;
  item.dataset.index = String(position);
  const image = document.createElement("img");
  image.src = result.thumb;
  image.alt = result.name;
  image.title = `${result.name}: click for more like this`;
  image.loading = "lazy";
  image.addEventListener("click", () => moreLikeThis(position));
  const caption = document.createElement("div");
  caption.className = "caption";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${result.rank}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = result.score.toFixed(3);
  const view = document.createElement("button");
  view.type = "button";
  view.className = "view";
  view.textContent = "\u2922";
  view.title = "full image";
  view.setAttribute("aria-label", `full image of ${result.name}`);
  view.addEventListener("click", () => openViewer(position));
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = result.name;
  caption.append(rank, score, view, name);
  item.append(image, caption);
  item.addEventListener("focus", () => { state.selected = position; });
  return item;
}

function renderResults(results) {
  state.results = results;
  state.selected = -1;
  const list = $("results");
  list.replaceChildren(...results.map(card));
  if (!results.length) setStatus("no results");
}

function select(position) {
  const cards = $("results").children;
  if (!cards.length) return;
  state.selected = Math.max(0, Math.min(cards.length - 1, position));
  cards[state.selected].focus();
}

function moreLikeThis(position) {
  const result = state.results[position];
  if (!result) return;
  closeViewer();
  runQuery({ kind: "id", id: result.id, name: result.name });
}

function openViewer(position) {
  const result = state.results[position];
  if (!result) return;
  state.viewing = position;
  $("viewer-image").src = result.image;
  $("viewer-image").alt = result.name;
  $("viewer-caption").textContent = `#${result.rank}  ${result.score.toFixed(3)}  ${result.name}`;
  const dialog = $("viewer");
  if (!dialog.open) dialog.showModal();
}

// Closing hands the focus back to the viewed result at once (Escape, the Close button, "more like this"); the
// dialog's own close event only does it where the browser closed the dialog by itself.
function closeViewer() {
  const position = state.viewing;
  state.viewing = -1;
  const dialog = $("viewer");
  if (dialog.open) dialog.close();
  if (position >= 0) select(position);
}

function onViewerClosed() {
  if (state.viewing >= 0) closeViewer();
}

function columns() {
  const cards = $("results").children;
  if (cards.length < 2) return 1;
  const top = cards[0].offsetTop;
  let n = 0;
  while (n < cards.length && cards[n].offsetTop === top) n += 1;
  return Math.max(1, n);
}

function onKey(event) {
  const dialog = $("viewer");
  const active = document.activeElement.tagName;
  const typing = ["INPUT", "TEXTAREA"].includes(active);
  const pressing = active === "BUTTON" && (event.key === "Enter" || event.key === " ");
  if (dialog.open) {
    if (event.key === "ArrowRight") openViewer(Math.min(state.results.length - 1, state.viewing + 1));
    else if (event.key === "ArrowLeft") openViewer(Math.max(0, state.viewing - 1));
    else if (event.key === "Enter") moreLikeThis(state.viewing);
    else if (event.key === "Escape") closeViewer();
    else return;
    event.preventDefault();
    return;
  }
  if (typing || pressing) return;
  const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() };
  if (event.key in moves) {
    select(state.selected < 0 ? 0 : state.selected + moves[event.key]);
  } else if (event.key === "Enter" && state.selected >= 0) {
    moreLikeThis(state.selected);
  } else if ((event.key === " " || event.key === "v") && state.selected >= 0) {
    openViewer(state.selected);
  } else if (event.key === "/" && !$("text-form").hidden) {
    $("query-text").focus();
  } else {
    return;
  }
  event.preventDefault();
}

function imageFrom(items) {
  for (const item of Array.from(items || [])) {
    const file = item instanceof File ? item : (item.kind === "file" ? item.getAsFile() : null);
    if (file) return file;
  }
  return null;
}

function wireInputs() {
  $("query-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) runQuery({ kind: "image", file });
    event.target.value = "";
  });
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runQuery({ kind: "text", text: $("query-text").value });
  });
  $("k").addEventListener("change", () => {
    if (state.lastQuery) runQuery(state.lastQuery);
  });
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  document.addEventListener("dragleave", () => zone.classList.remove("over"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = imageFrom(event.dataTransfer && event.dataTransfer.files);
    if (file) runQuery({ kind: "image", file });
  });
  document.addEventListener("paste", (event) => {
    const file = imageFrom(event.clipboardData && event.clipboardData.items);
    if (file) {
      event.preventDefault();
      runQuery({ kind: "image", file });
    }
  });
  document.addEventListener("keydown", onKey);
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-more").addEventListener("click", () => moreLikeThis(state.viewing));
  $("viewer-prev").addEventListener("click", () => openViewer(Math.max(0, state.viewing - 1)));
  $("viewer-next").addEventListener("click",
    () => openViewer(Math.min(state.results.length - 1, state.viewing + 1)));
  $("viewer").addEventListener("close", onViewerClosed);
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    const info = await response.json();
    state.info = info;
    $("text-form").hidden = !info.text;
    $("k").max = String(info.max_k);
    const kind = info.index && info.index.kind ? `, ${info.index.kind} index` : "";
    $("info").textContent = `${info.images} images \u00b7 ${info.model}${kind}` +
      (info.text ? " \u00b7 image or text queries" : " \u00b7 image queries");
  } catch (err) {
    showError(`cannot read the collection's description (${err.message})`);
  }
}

wireInputs();
loadInfo();
