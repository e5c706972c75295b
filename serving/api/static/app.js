// The search page: plain JS over the service's JSON API. The API key lives in sessionStorage (this tab
// only) and goes out as an Authorization header, never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "corinfomax-api-key";
const thumbnails = new Map(); // collection/id -> object URL, so a thumbnail is fetched once per page

function collection() {
  return $("collection").value || "default";
}

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, body) {
  const isForm = body instanceof FormData;
  const response = await fetch(path, {
    method: "POST",
    headers: isForm ? headers() : { ...headers(), "Content-Type": "application/json" },
    body: isForm ? body : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function k() {
  return Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12));
}

function fill(dl, rows) {
  dl.replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null).flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    return [dt, dd];
  }));
}

const percent = (x) => (x === undefined || x === null ? undefined : `${(100 * x).toFixed(1)}%`);

async function loadCollections() {
  const chosen = collection();
  const { collections } = await api("/collections", {});
  $("collection").replaceChildren(...collections.map((c) => {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = `${c.name} (${c.model} ${c.version}, ${c.count} items)`;
    return option;
  }));
  $("collection").value = collections.some((c) => c.name === chosen) ? chosen : "default";
}

async function loadInfo() {
  try {
    await loadCollections();
    const which = { collection: collection() };
    const [info, stats] = await Promise.all([api("/info", which), api("/stats", which)]);
    const m = info.model;
    const training = m.training || {};
    const results = (m.evaluation && m.evaluation.results) || {};
    const trained = results.trained || {};
    fill($("card"), [
      ["name", `${m.name} ${m.version}`],
      ["backbone", m.backbone],
      ["training data", training.dataset || training.data],
      ["epochs", training.epochs_trained],
      ["resolution", m.input && m.input.size.join(" x ")],
      ["embedding", `${m.embedding_dim} dims, ${m.precision}`],
      ["kNN top-1", percent(trained.knn_top1)],
      ["linear top-1", percent(trained.linear_top1)],
      ["random init kNN", percent(results.random_init && results.random_init.knn_top1)],
    ]);
    $("intended-use").textContent = m.intended_use || "";
    fill($("stats"), [
      ["items", stats.count], ["labelled", stats.labelled], ["thumbnails", stats.thumbnails],
      ["index", stats.kind], ["recall@10", stats.recall_at_10],
    ]);
    status("Ready.");
  } catch (err) {
    status(err.message, true);
  }
}

async function thumbnailUrl(id) {
  const name = collection();
  const key = `${name}/${id}`;
  if (!thumbnails.has(key)) {
    const response = await fetch(`/thumbnails/${id}?collection=${encodeURIComponent(name)}`, { headers: headers() });
    if (!response.ok) return null; // e.g. an item added as a vector: no thumbnail
    thumbnails.set(key, URL.createObjectURL(await response.blob()));
  }
  return thumbnails.get(key);
}

function showResults(hits, title) {
  $("results-title").textContent = title;
  $("results").replaceChildren(...hits.map((hit) => {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.id = hit.id;
    li.title = "search by this item";
    const img = document.createElement("img");
    img.alt = hit.label || `item ${hit.id}`;
    thumbnailUrl(hit.id).then((url) => { if (url) img.src = url; else img.alt = "no thumbnail"; });
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `#${hit.id} ${Object.entries(hit.metadata || {}).map(([a, b]) => `${a}: ${b}`).join(", ")}`;
    const line = document.createElement("div");
    line.innerHTML = '<span class="score"></span> <span class="label"></span>';
    line.querySelector(".score").textContent = hit.score.toFixed(3);
    line.querySelector(".label").textContent = hit.label || "";
    li.append(img, line, meta);
    li.addEventListener("click", () => searchById(hit.id));
    return li;
  }));
}

function showClasses(predictions) {
  if (!predictions) {
    $("classes").innerHTML = '<p class="muted">Classes are shown for image queries.</p>';
    return;
  }
  $("classes").replaceChildren(...predictions.map((p) => {
    const row = document.createElement("div");
    row.className = "bar";
    const name = document.createElement("span");
    const bar = document.createElement("div");
    const value = document.createElement("span");
    name.textContent = p.label;
    bar.style.width = `${(100 * p.probability).toFixed(1)}%`;
    value.textContent = percent(p.probability);
    row.append(name, document.createElement("span"), value);
    row.children[1].append(bar);
    return row;
  }));
}

async function run(label, search, classify) {
  status(`Searching ${label}...`);
  try {
    const [found, classes] = await Promise.all([search, classify]);
    showResults(found.results[0], `Nearest neighbours of ${label}`);
    showClasses(classes && classes.predictions[0]);
    status(`${found.results[0].length} neighbours of ${label}.`);
  } catch (err) {
    status(err.message, true);
  }
}

function form(file, extra) {
  const body = new FormData();
  body.append("images", file);
  body.append("collection", JSON.stringify(collection()));
  for (const [name, value] of Object.entries(extra)) body.append(name, value);
  return body;
}

function searchByFile(file) {
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  run(file.name, api("/search", form(file, { k: k() })), api("/classify", form(file, { k: 5 })).catch(() => null));
}

function searchByUrl(url) {
  $("preview").src = url;
  $("preview").hidden = false;
  const c = collection();
  run(url, api("/search", { urls: [url], k: k(), collection: c }),
    api("/classify", { urls: [url], k: 5, collection: c }).catch(() => null));
}

function searchById(id) {
  thumbnailUrl(id).then((url) => { $("preview").src = url || ""; $("preview").hidden = !url; });
  run(`item #${id}`, api("/search", { ids: [id], k: k(), collection: collection() }), Promise.resolve(null));
}

function setUp() {
  $("key").value = sessionStorage.getItem(KEY) || "";
  $("key").addEventListener("change", () => {
    sessionStorage.setItem(KEY, $("key").value.trim());
    thumbnails.clear();
    loadInfo();
  });
  $("collection").addEventListener("change", () => {
    $("results").replaceChildren();
    $("results-title").textContent = "Nearest neighbours";
    loadInfo();
  });
  $("file").addEventListener("change", () => { if ($("file").files[0]) searchByFile($("file").files[0]); });
  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("url").value) searchByUrl($("url").value);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) searchByFile(file);
  });
  loadInfo();
}

setUp();
