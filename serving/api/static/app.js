// The search page: plain JS over the service's JSON API. The API key lives in sessionStorage (this tab
// only) and goes out as an Authorization header, never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "corinfomax-api-key";
const thumbnails = new Map(); // collection/id -> object URL, so a thumbnail is fetched once per page
// "More like this" / "less like this" picks: stored ids, sent to /recommend as they change.
const examples = { positive: [], negative: [] };
let again = null; // re-runs what is on screen, so that a changed filter applies to it
let query = null; // re-runs the last search (by image, URL or item): what the page returns to without examples
let lastImage = null; // the image searched by last ({file} or {url}): what "duplicates of this image" checks
let latest = 0; // the newest request's number: an older answer arriving late must not replace a newer one

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

// The filter box as the API's "filter" object: a label and one metadata field (its value read as JSON when it
// parses, so 2020, true and {"gte": 2020} keep their types; else as text). Undefined when empty, so the request
// leaves "filter" out and answers as an unfiltered one.
function filter() {
  const conditions = {};
  const label = $("filter-label").value.trim();
  const path = $("filter-path").value.trim();
  if (label) conditions.label = label;
  if (path) conditions[`metadata.${path}`] = parseValue($("filter-value").value.trim());
  return Object.keys(conditions).length ? conditions : undefined;
}

function parseValue(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

// The score floor for searches and recommendations; undefined (not sent) when the field is empty.
function minScore() {
  const value = parseFloat($("min-score").value);
  return Number.isFinite(value) ? value : undefined;
}

// What narrows a search: the filter, the score floor and, when asked for, near-duplicates folded into the
// best ranked of them (the API keeps k results); unset options are left out of the request.
function narrowing() {
  return { filter: filter(), score_threshold: minScore(), dedup: $("fold").checked || undefined };
}

function threshold() {
  const value = parseFloat($("threshold").value);
  return Number.isFinite(value) ? value : 0.95;
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
  const { collections } = await api("/collections", {});
  const chosen = collection(); // read after the answer: the person may have picked one meanwhile
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
    if (!again) status("Ready."); // a key typed in while answers show must not hide how their request went
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
  if (!hits.length) {
    const li = document.createElement("li");
    li.className = "muted none";
    li.textContent = "No stored item matches.";
    $("results").replaceChildren(li);
    return;
  }
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
    if (hit.duplicates && hit.duplicates.length) meta.textContent += ` (folded in: #${hit.duplicates.join(", #")})`;
    const line = document.createElement("div");
    line.innerHTML = '<span class="score"></span> <span class="label"></span>';
    line.querySelector(".score").textContent = hit.score.toFixed(3);
    line.querySelector(".label").textContent = hit.label || "";
    const frame = document.createElement("div"); // a square that does not change size when the image arrives,
    frame.className = "thumb"; // so the tiles' buttons stay where the pointer is
    frame.append(img);
    li.append(frame, line, meta, actions(hit));
    li.addEventListener("click", () => searchById(hit.id));
    return li;
  }));
}

function actions(hit) {
  const row = document.createElement("div");
  row.className = "actions";
  const button = (name, text, title, onClick) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `plain ${name}`;
    b.textContent = text;
    b.title = title;
    b.addEventListener("click", (event) => {
      event.stopPropagation(); // the tile's own click searches by the item
      onClick();
    });
    return b;
  };
  row.append(
    button("more", "more", "more like this", () => addExample("positive", hit)),
    button("less", "less", "less like this", () => addExample("negative", hit)),
    button("dups", "dups", "stored near-copies of this item", () => duplicatesOfId(hit.id)),
  );
  return row;
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

// Shows the answer to one request (and the probe's classes for an image query); `rerun` is kept so that
// a changed filter applies to what is on screen.
async function run(title, request, rerun, classes = Promise.resolve(null)) {
  again = rerun;
  const ticket = ++latest;
  status(`${title}...`);
  try {
    const [found, predicted] = await Promise.all([request(), classes]);
    if (ticket !== latest) return;
    showResults(found.results[0], title);
    showClasses(predicted && predicted.predictions[0]);
    const n = found.results[0].length;
    status(`${n} ${n === 1 ? "result" : "results"}.`);
  } catch (err) {
    if (ticket === latest) status(err.message, true);
  }
}

function form(file, fields) {
  const body = new FormData();
  body.append("images", file);
  body.append("collection", JSON.stringify(collection()));
  for (const [name, value] of Object.entries(fields)) {
    // A form carries text: objects (the filter) go as JSON text, as the API reads them.
    if (value !== undefined) body.append(name, typeof value === "object" ? JSON.stringify(value) : value);
  }
  return body;
}

function showQuery(src, image) {
  $("preview").src = src;
  $("preview").hidden = false;
  lastImage = image;
  $("dup-query").disabled = false;
}

// The probe's top classes for an image query (none when the collection's model has no probe).
function classify({ file, url }) {
  const request = file ? api("/classify", form(file, { k: 5 }))
    : api("/classify", { urls: [url], k: 5, collection: collection() });
  return request.catch(() => null);
}

function searchByFile(file) {
  showQuery(URL.createObjectURL(file), { file });
  const search = () => api("/search", form(file, { k: k(), ...narrowing() }));
  query = () => searchByFile(file);
  run(`Nearest neighbours of ${file.name}`, search, query, classify(lastImage));
}

function searchByUrl(url) {
  showQuery(url, { url });
  const search = () => api("/search", { urls: [url], k: k(), collection: collection(), ...narrowing() });
  query = () => searchByUrl(url);
  run(`Nearest neighbours of ${url}`, search, query, classify(lastImage));
}

function searchById(id) {
  thumbnailUrl(id).then((url) => { $("preview").src = url || ""; $("preview").hidden = !url; });
  const search = () => api("/search", { ids: [id], k: k(), collection: collection(), ...narrowing() });
  query = () => searchById(id);
  run(`Nearest neighbours of item #${id}`, search, query);
}

function addExample(kind, hit) {
  const other = kind === "positive" ? "negative" : "positive";
  examples[other] = examples[other].filter((e) => e.id !== hit.id); // an item is liked or disliked, not both
  if (!examples[kind].some((e) => e.id === hit.id)) examples[kind].push({ id: hit.id, label: hit.label });
  recommend();
}

function removeExample(kind, id) {
  examples[kind] = examples[kind].filter((e) => e.id !== id);
  recommend();
}

function showExamples() {
  const chips = ["positive", "negative"].flatMap((kind) => examples[kind].map((e) => {
    const chip = document.createElement("span");
    chip.className = `chip ${kind}`;
    chip.dataset.id = e.id;
    chip.textContent = `${kind === "positive" ? "+" : "\u2212"} #${e.id}${e.label ? ` ${e.label}` : ""}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "plain";
    remove.textContent = "\u00d7";
    remove.title = "remove this example";
    remove.addEventListener("click", () => removeExample(kind, e.id));
    chip.append(remove);
    return chip;
  }));
  $("chips").replaceChildren(...chips);
  $("examples").hidden = !chips.length;
}

function recommend() {
  showExamples();
  const positive = examples.positive.map((e) => e.id);
  const negative = examples.negative.map((e) => e.id);
  if (negative.length && !positive.length) {
    status('Add a "more like this" example to recommend.'); // the API needs one; "less" alone waits for it
    return;
  }
  if (!positive.length) {
    if (query) query();
    return;
  }
  const request = () => api("/recommend", {
    positive, negative: negative.length ? negative : undefined, strategy: $("strategy").value, k: k(),
    collection: collection(), filter: filter(), score_threshold: minScore(), // /recommend does not dedup
  });
  const unlike = negative.length ? `, unlike #${negative.join(", #")}` : "";
  run(`Like #${positive.join(", #")}${unlike}`, request, recommend);
}

function duplicatesOfId(id) {
  const t = threshold();
  const request = () => api("/duplicates", { ids: [id], threshold: t, k: k(), collection: collection() });
  run(`Duplicates of item #${id} (similarity \u2265 ${t})`, request, () => duplicatesOfId(id));
}

function duplicatesOfImage() {
  const t = threshold();
  const { file, url } = lastImage;
  const request = file
    ? () => api("/duplicates", form(file, { threshold: t, k: k() }))
    : () => api("/duplicates", { urls: [url], threshold: t, k: k(), collection: collection() });
  run(`Duplicates of ${file ? file.name : url} (similarity \u2265 ${t})`, request, duplicatesOfImage,
    classify(lastImage));
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
    examples.positive = []; // ids belong to one collection
    examples.negative = [];
    showExamples();
    again = null;
    query = null;
    loadInfo();
  });
  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (again) again();
    else status("Filter set: it applies to the next search.");
  });
  $("filter-form").addEventListener("reset", () => setTimeout(() => again && again())); // after the fields empty
  $("strategy").addEventListener("change", recommend);
  $("clear-examples").addEventListener("click", () => {
    examples.positive = [];
    examples.negative = [];
    recommend();
  });
  $("dup-query").addEventListener("click", duplicatesOfImage);
  $("file").addEventListener("change", () => {
    if ($("file").files[0]) searchByFile($("file").files[0]);
    $("file").value = ""; // picking the same file again is a change too: a search with other settings
  });
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
