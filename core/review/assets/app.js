// lorakit review page: plain JavaScript, no build step. Every change is a POST to /api/edit,
// which records it in the curation file and rewrites the captions and manifest at once.
"use strict";

const CSRF = document.querySelector('meta[name="csrf"]').content;
const PAGE_SIZE = 200;
const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;  // CSSOM, which the page's CSP allows
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const state = {
  summary: null, filter: emptyFilter(), page: 0, total: 0, items: [], focus: 0,
  selected: new Set(), viewerIndex: null, viewer: null, viewerMode: "image", view: "gallery",
  pageSeq: 0, asideSeq: 0, maskSeq: 0,
};

function emptyFilter() {
  return { status: "image", subset: [], tags: [], mode: "and", not: [], text: "", bucket: "",
           mask: "any", edited: "any", aside_step: "", aside_reason: "", dedupe: "" };
}

// ----- talking to the server ------------------------------------------------------------------
async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  const data = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

async function post(url, body) {
  const r = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF }, body: JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function say(text, isError = false) {
  const m = $("#message");
  m.textContent = text;
  m.title = text;
  m.classList.toggle("error", isError);
}

function filterQuery(f = state.filter) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) {
    if (Array.isArray(v)) v.forEach((x) => q.append(k, x));
    else if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  }
  return q;
}

function filterObject(f = state.filter) {
  const out = {};
  for (const [k, v] of Object.entries(f)) if (!(v === "" || (Array.isArray(v) && !v.length))) out[k] = v;
  return out;
}

const thumbURL = (it) => `/media/thumb/${it.id}?v=${encodeURIComponent(it.version)}`;

// ----- summary: subsets, tags, buckets ------------------------------------------------------
async function loadSummary() {
  state.summary = await getJSON("/api/summary");
  const s = state.summary;
  $("#count-aside").textContent = s.set_aside || "";
  $("#count-dupes").textContent = s.dedupe_groups || "";
  $("#count-masks").textContent = s.masks || "";
  const subsets = $("#f-subsets");
  subsets.replaceChildren(...s.subsets.map((sub) => el("label", {},
    el("input", { type: "checkbox", value: sub.name, checked: state.filter.subset.includes(sub.name),
                  onchange: (ev) => toggleList("subset", sub.name, ev.target.checked) }),
    ` ${sub.name} (${sub.images})`)));
  fillSelect($("#f-bucket"), [["", "any"], ...s.buckets.map(([b, n]) => [b, `${b} (${n})`])], state.filter.bucket);
  fillSelect($("#f-aside-step"), [["", "any step"], ...s.aside_steps.map(([st, n]) => [st, `${st} (${n})`])],
             state.filter.aside_step);
  fillSelect($("#aside-step"), [["", "all steps"], ...s.aside_steps.map(([st, n]) => [st, `${st} (${n})`])],
             $("#aside-step").value);
  const subsetOptions = s.subsets.map((x) => [x.name, x.name]);
  fillSelect($("#b-subset"), subsetOptions, $("#b-subset").value);
  fillSelect($("#v-subset"), subsetOptions, $("#v-subset").value);
  $("#tag-names").replaceChildren(...s.tags.slice(0, 2000).map(([t]) => el("option", { value: t })));
  renderTagList();
}

function fillSelect(select, options, value) {
  select.replaceChildren(...options.map(([v, label]) => el("option", { value: v, text: label })));
  if (options.some(([v]) => v === value)) select.value = value;
}

function renderTagList() {
  const needle = $("#tag-search").value.trim().toLowerCase();
  const tags = state.summary.tags.filter(([t]) => !needle || t.toLowerCase().includes(needle)).slice(0, 400);
  $("#tag-list").replaceChildren(...tags.map(([t, n]) => {
    const cls = state.filter.tags.includes(t) ? "inc" : state.filter.not.includes(t) ? "exc" : "";
    return el("li", { class: cls, "data-tag": t, title: "click: require; shift-click or right-click: exclude",
                      onclick: (ev) => tagClicked(t, ev.shiftKey || ev.altKey),
                      oncontextmenu: (ev) => { ev.preventDefault(); tagClicked(t, true); } },
              el("span", { text: t }), el("span", { class: "n", text: n }));
  }));
  $("#f-chips").replaceChildren(
    ...state.filter.tags.map((t) => el("span", { class: "chip inc", text: `+ ${t}`, title: "remove from the filter",
                                                 onclick: () => dropTag(t) })),
    ...state.filter.not.map((t) => el("span", { class: "chip exc", text: `− ${t}`, title: "remove from the filter",
                                                onclick: () => dropTag(t) })));
}

function tagClicked(tag, exclude) {
  const f = state.filter;
  const had = exclude ? f.not.includes(tag) : f.tags.includes(tag);
  dropTag(tag, false);
  if (!had) (exclude ? f.not : f.tags).push(tag);
  filterChanged();
}

function dropTag(tag, refresh = true) {
  state.filter.tags = state.filter.tags.filter((t) => t !== tag);
  state.filter.not = state.filter.not.filter((t) => t !== tag);
  if (refresh) filterChanged();
}

function toggleList(key, value, on) {
  const list = state.filter[key].filter((v) => v !== value);
  if (on) list.push(value);
  state.filter[key] = list;
  filterChanged();
}

// ----- gallery ----------------------------------------------------------------------------------
function filterChanged() {
  state.page = 0;
  renderTagList();
  loadPage();
}

async function loadPage(keepFocus = false) {
  const q = filterQuery();
  q.set("offset", state.page * PAGE_SIZE);
  q.set("limit", PAGE_SIZE);
  const seq = ++state.pageSeq;
  let data;
  try {
    data = await getJSON(`/api/images?${q}`);
  } catch (e) { say(e.message, true); return; }
  if (seq !== state.pageSeq) return;  // a newer filter's answer is on its way
  state.total = data.total;
  state.items = data.items;
  if (!keepFocus) state.focus = 0;
  state.focus = Math.min(state.focus, Math.max(0, state.items.length - 1));
  renderGrid();
}

function renderGrid() {
  $("#match-count").textContent = `${state.total} image(s) match`;
  $("#sel-count").textContent = `${state.selected.size} selected`;
  const grid = $("#grid");
  grid.replaceChildren(...state.items.map((it, i) => {
    const badges = el("div", { class: "badges" },
      it.edited ? el("span", { class: "badge edited", text: "edited" }) : null,
      it.kind === "aside" ? el("span", { class: "badge aside", text: it.aside_step }) : null,
      it.mask ? el("span", { class: "badge mask", text: "mask" }) : null,
      it.mask_rejected ? el("span", { class: "badge rejected", text: "mask rejected" }) : null);
    const cell = el("div", { class: "cell", "data-id": it.id, "data-index": i,
                             title: it.kind === "aside" ? `${it.aside_step}: ${it.aside_reason}` : it.caption },
      it.has_file ? el("img", { src: thumbURL(it), loading: "lazy", alt: it.name }) : el("div", { class: "noimg", text: "no file" }),
      badges,
      el("input", { type: "checkbox", class: "check", checked: state.selected.has(it.id), tabindex: -1,
                    onclick: (ev) => { ev.stopPropagation(); toggleSelect(it.id, ev.target.checked); } }),
      el("div", { class: "label", text: `${it.subset}/${it.name}` }));
    cell.classList.toggle("selected", state.selected.has(it.id));
    cell.classList.toggle("focus", i === state.focus);
    cell.addEventListener("click", (ev) => {
      state.focus = i;
      if (ev.ctrlKey || ev.metaKey || ev.shiftKey) toggleSelect(it.id);
      else openViewer(i);
      markFocus();
    });
    return cell;
  }));
  const pages = Math.max(1, Math.ceil(state.total / PAGE_SIZE));
  for (const pager of [$("#pager-top"), $("#pager-bottom")]) {
    pager.replaceChildren(
      el("button", { text: "‹ prev", disabled: state.page === 0, onclick: () => gotoPage(state.page - 1) }),
      el("span", { text: `page ${state.page + 1} of ${pages}` }),
      el("button", { text: "next ›", disabled: state.page >= pages - 1, onclick: () => gotoPage(state.page + 1) }));
  }
}

function gotoPage(page) {
  const pages = Math.max(1, Math.ceil(state.total / PAGE_SIZE));
  if (page < 0 || page >= pages) return;
  state.page = page;
  loadPage();
  $("#grid").scrollTop = 0;
}

function markFocus() {
  document.querySelectorAll("#grid .cell").forEach((c, i) => c.classList.toggle("focus", i === state.focus));
  const cell = document.querySelector(`#grid .cell[data-index="${state.focus}"]`);
  if (cell) cell.scrollIntoView({ block: "nearest" });
}

function toggleSelect(id, on) {
  const want = on === undefined ? !state.selected.has(id) : on;
  if (want) state.selected.add(id); else state.selected.delete(id);
  const cell = document.querySelector(`#grid .cell[data-id="${id}"]`);
  if (cell) { cell.classList.toggle("selected", want); $(".check", cell).checked = want; }
  $("#sel-count").textContent = `${state.selected.size} selected`;
}

function columns() {
  const cells = document.querySelectorAll("#grid .cell");
  if (cells.length < 2) return 1;
  const top = cells[0].offsetTop;
  let n = 0;
  for (const c of cells) { if (c.offsetTop !== top) break; n++; }
  return Math.max(1, n);
}

// ----- batch edits --------------------------------------------------------------------------------
const OP_FIELDS = {
  add_tag: ["#b-tag", "#b-position"], remove_tag: ["#b-tag"], replace_tag: ["#b-tag", "#b-new"],
  move_front: ["#b-tag"], move_subset: ["#b-subset"], exclude: ["#b-note"], restore: [],
};

function showOpFields() {
  const fields = OP_FIELDS[$("#b-op").value];
  for (const sel of ["#b-tag", "#b-new", "#b-position", "#b-subset", "#b-note"]) $(sel).hidden = !fields.includes(sel);
}

function target() {
  if ($("#b-target").value === "filter") return { filter: filterObject() };
  return { ids: [...state.selected] };
}

async function edit(body, label) {
  try {
    const result = await post("/api/edit", body);
    say(result.message || `${label}: done`);
    await refresh();
    return result;
  } catch (e) { say(e.message, true); return null; }
}

async function applyBatch() {
  const op = $("#b-op").value;
  const t = target();
  if (t.ids && !t.ids.length) { say("select images first, or apply to everything the filter shows", true); return; }
  const body = { op, target: t };
  if (OP_FIELDS[op].includes("#b-tag")) body.tag = $("#b-tag").value.trim();
  if (op === "replace_tag") body.new = $("#b-new").value.trim();
  if (op === "add_tag") body.position = $("#b-position").value;
  if (op === "move_subset") body.subset = $("#b-subset").value;
  if (op === "exclude") body.note = $("#b-note").value.trim();
  if (await edit(body, op)) state.selected.clear();
  renderGrid();
}

async function undo() {
  try {
    const result = await post("/api/undo", {});
    say(result.message || "undone");
    await refresh();
  } catch (e) { say(e.message, true); }
}

async function refresh() {
  await loadSummary();
  await loadPage(true);
  if (state.viewer) {
    // the image may have left the list (excluded, moved): show the one that took its place
    const still = state.items.find((it) => it.id === state.viewer.id);
    const next = still || state.items[Math.min(state.viewerIndex, state.items.length - 1)];
    if (!next) closeViewer();
    else {
      state.viewerIndex = state.items.indexOf(next);
      await showViewerItem(next.id, !still);
    }
  }
  if (state.view !== "gallery") await showView(state.view);
}

// ----- the large view -------------------------------------------------------------------------------
async function openViewer(index) {
  state.viewerIndex = index;
  const it = state.items[index];
  if (!it) return;
  await showViewerItem(it.id);
}

async function showViewerItem(id, reset = true) {
  let d;
  try { d = await getJSON(`/api/image/${id}`); } catch (e) {
    say(e.message, true); closeViewer(); return;
  }
  state.viewer = d;
  if (reset) state.viewerMode = "image";
  $("#viewer").hidden = false;
  $("#v-name").textContent = `${d.subset}/${d.name}`;
  const facts = [`${d.width}×${d.height}`, d.bucket ? `bucket ${d.bucket}` : null, d.edited ? "edited by hand" : null,
                 d.kind === "aside" ? `set aside by ${d.aside_step}: ${d.aside_reason}` : null,
                 d.mask_rejected ? `mask rejected: ${d.mask_rejected}` : (d.mask ? "mask accepted" : null),
                 d.dedupe_group !== null ? `duplicate group #${d.dedupe_group}` : null].filter(Boolean);
  $("#v-facts").replaceChildren(...facts.map((f) => el("div", { text: f })));
  $("#v-caption").value = d.caption || "";
  $("#v-tags").replaceChildren(...(d.tags || []).map((t) => el("li", {},
    el("span", { class: "name", text: t.name }),
    el("span", { class: "scorebar" }, el("div", { style: `width:${Math.round((t.score ?? 0) * 100)}%` })),
    el("span", { class: "score", text: t.score === null || t.score === undefined ? "–" : t.score.toFixed(2) }),
    el("button", { text: "⇤", title: "move to the front", onclick: () => edit({ op: "move_front", tag: t.name, target: { ids: [d.id] } }, "move") }),
    el("button", { text: "×", title: "remove this tag", onclick: () => edit({ op: "remove_tag", tag: t.name, target: { ids: [d.id] } }, "remove") }))));
  fillSelect($("#v-subset"), (state.summary?.subsets || []).map((x) => [x.name, x.name]), d.subset);
  $("#v-meta").textContent = JSON.stringify({ source: d.source, steps: d.steps, meta: d.meta }, null, 2);
  const isAside = d.kind === "aside";
  $("#v-exclude").hidden = isAside;
  $("#v-restore").hidden = !isAside;
  $("#v-save-caption").hidden = isAside;
  $("#v-mask-accept").hidden = !d.mask_rejected;
  $("#v-mask-reject").hidden = !d.mask || !!d.mask_rejected;
  document.querySelector('.modes [data-mode="overlay"]').hidden = !d.mask_view;
  document.querySelector('.modes [data-mode="compare"]').hidden = !d.has_source;
  renderStage();
}

function renderStage() {
  const d = state.viewer;
  const mode = (state.viewerMode === "overlay" && !d.mask_view) || (state.viewerMode === "compare" && !d.has_source)
    ? "image" : state.viewerMode;
  document.querySelectorAll(".modes button").forEach((b) => b.classList.toggle("active", b.dataset.mode === mode));
  const img = (kind, alt) => el("img", { src: `/media/${kind}/${d.id}`, alt });
  const stage = $("#viewer-stage");
  if (mode === "overlay") {
    stage.replaceChildren(el("figure", {}, el("div", { class: "overlay" }, img("image", d.name),
      el("img", { class: "mask", src: `/media/mask/${d.id}`, alt: "mask", style: `opacity:${$("#mask-opacity").value / 100}` })),
      el("figcaption", { text: d.mask_rejected ? `mask rejected: ${d.mask_rejected}` : "dark = ignored by masked loss" })));
  } else if (mode === "compare") {
    stage.replaceChildren(el("figure", {}, img("source", "source"), el("figcaption", { text: "source (before)" })),
                          el("figure", {}, img("image", "result"), el("figcaption", { text: `result (after ${d.steps.slice(1).join(", ")})` })));
  } else {
    stage.replaceChildren(el("figure", {}, img("image", d.name)));
  }
}

function closeViewer() {
  $("#viewer").hidden = true;
  state.viewer = null;
  $("#grid").focus();
}

function viewerStep(delta) {
  if (state.viewerIndex === null) return;
  const next = state.viewerIndex + delta;
  if (next >= 0 && next < state.items.length) {
    state.focus = next;
    markFocus();
    openViewer(next);
  }
}

// ----- other views --------------------------------------------------------------------------------------
async function showView(name) {
  state.view = name;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === name));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === `view-${name}`));
  try {
    if (name === "aside") await renderAside();
    if (name === "dupes") await renderDupes();
    if (name === "masks") await renderMasks();
    if (name === "stats") renderStats();
    if (name === "history") await renderHistory();
  } catch (e) { say(e.message, true); }
}

async function renderAside() {
  const f = { ...emptyFilter(), status: "aside", aside_step: $("#aside-step").value };
  const q = filterQuery(f);
  q.set("limit", 500);
  const seq = ++state.asideSeq;
  const data = await getJSON(`/api/images?${q}`);
  if (seq !== state.asideSeq) return;
  $("#aside-summary").textContent = `${data.total} set aside` + (data.total > 500 ? " (first 500 shown)" : "");
  $("#aside-list").replaceChildren(...data.items.map((it) => el("div", { class: "card", "data-id": it.id },
    it.has_file ? el("img", { src: thumbURL(it), loading: "lazy", alt: it.name }) : el("div", { text: "no copy kept" }),
    el("div", { class: "reason" }, el("span", { class: "step", text: it.aside_step }), `: ${it.aside_reason}`),
    el("div", { class: "row" }, el("span", { text: it.name }),
       el("button", { class: "restore", text: "Restore", onclick: () => edit({ op: "restore", target: { ids: [it.id] } }, "restore") })))));
}

async function renderDupes() {
  const data = await getJSON("/api/dedupe");
  if (!data.groups.length) { $("#dupe-list").replaceChildren(el("p", { text: "No duplicate groups (run the dedupe step)." })); return; }
  $("#dupe-list").replaceChildren(...data.groups.map((g) => {
    const keeper = el("figure", { class: "keeper" },
      g.kept_id ? el("img", { src: `/media/thumb/${g.kept_id}`, alt: g.kept }) : el("div", { text: "(gone)" }),
      el("figcaption", {}, el("span", { class: "keeper-mark", text: "kept " }), `${g.kept} ${g.size ? g.size.join("×") : ""}`));
    const members = g.members.map((m) => el("figure", {},
      m.id ? el("img", { src: `/media/thumb/${m.id}`, alt: m.name }) : el("div", { text: "(no copy)" }),
      el("figcaption", { text: `${m.name} ${m.size ? m.size.join("×") : ""} · distance ${m.distance}${m.exact ? " (exact)" : ""}`
                               + (m.kind === "image" ? " · restored, in the dataset" : " · set aside") }),
      m.id ? el("button", { text: "Keep this one instead",
                            onclick: () => edit({ op: "keeper", group: g.index, target: { ids: [m.id] } }, "keeper") }) : null));
    return el("div", { class: "dupe-group", "data-group": g.index },
      el("div", { text: `#${g.index} · ${g.subset} · ${g.members.length + 1} images` }),
      el("div", { class: "members" }, keeper, ...members));
  }));
}

async function renderMasks() {
  const f = { ...emptyFilter(), mask: $("#mask-which").value };
  const q = filterQuery(f);
  q.set("limit", 200);
  const seq = ++state.maskSeq;
  const data = await getJSON(`/api/images?${q}`);
  if (seq !== state.maskSeq) return;
  const opacity = $("#mask-opacity").value / 100;
  $("#mask-list").replaceChildren(...data.items.map((it) => el("div", { class: "card", "data-id": it.id },
    el("div", { class: "overlay" }, el("img", { src: thumbURL(it), loading: "lazy", alt: it.name }),
       it.mask_view ? el("img", { class: "mask", src: `/media/mask/${it.id}`, loading: "lazy", alt: "mask", style: `opacity:${opacity}` }) : null),
    el("div", { class: "reason", text: it.mask_rejected ? `rejected: ${it.mask_rejected}` : "accepted" }),
    el("div", { class: "row" }, el("span", { text: it.name }),
       it.mask_rejected ? el("button", { text: "Accept", onclick: () => edit({ op: "mask", verdict: "accept", target: { ids: [it.id] } }, "mask") })
                        : el("button", { text: "Reject", onclick: () => edit({ op: "mask", verdict: "reject", target: { ids: [it.id] } }, "mask") })))));
}

function renderStats() {
  const s = state.summary;
  const batch = Math.max(1, +$("#batch-size").value || 1);
  const epochs = Math.max(1, +$("#epochs").value || 1);
  const rows = s.subsets.map((x) => el("tr", {}, el("td", { text: x.name + (x.is_reg ? " (reg)" : "") }),
    el("td", { text: x.images }), el("td", { text: x.repeats }), el("td", { text: x.images * x.repeats }),
    el("td", { text: Math.ceil(x.images * x.repeats / batch) })));
  const total = s.subsets.filter((x) => !x.is_reg).reduce((a, x) => a + x.images * x.repeats, 0);
  $("#steps-table").replaceChildren(
    el("tr", {}, ...["subset", "images", "repeats", "images × repeats", "steps/epoch"].map((h) => el("th", { text: h }))),
    ...rows,
    el("tr", {}, el("th", { text: "total (without reg)" }), el("th"), el("th"), el("th", { text: total }),
       el("th", { text: `${Math.ceil(total / batch)} → ${Math.ceil(total / batch) * epochs} in ${epochs} epochs` })));
  const max = Math.max(1, ...s.buckets.map(([, n]) => n));
  $("#bucket-hist").replaceChildren(...s.buckets.map(([b, n]) => el("div", { class: "bar" },
    el("span", { text: b }), el("div", { style: `width:${Math.round(300 * n / max)}px` }), el("span", { text: n }))));
  $("#subset-tags").replaceChildren(...s.subsets.map((x) => el("div", {}, el("h3", { text: `${x.repeats}_${x.name}` }),
    el("ol", {}, ...x.top_tags.map(([t, n]) => el("li", { text: `${t} (${n})` }))))));
}

async function renderHistory() {
  const data = await getJSON("/api/history");
  if (!data.edits.length) { $("#history-list").replaceChildren(el("li", { text: "No edits yet." })); return; }
  $("#history-list").replaceChildren(...data.edits.map((e) => el("li", {},
    el("span", { text: e.text }), " ", el("span", { class: "when", text: e.when || "" }))));
}

// ----- keyboard -------------------------------------------------------------------------------------------
document.addEventListener("keydown", (ev) => {
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
  if ((ev.ctrlKey || ev.metaKey) && ev.key === "z" && !typing) { ev.preventDefault(); undo(); return; }
  if (!$("#viewer").hidden) {
    if (ev.key === "Escape") { closeViewer(); return; }
    if (typing) return;
    if (ev.key === "ArrowRight") viewerStep(1);
    if (ev.key === "ArrowLeft") viewerStep(-1);
    return;
  }
  if (typing || state.view !== "gallery") return;
  const n = state.items.length;
  const move = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() }[ev.key];
  if (move !== undefined && n) {
    ev.preventDefault();
    state.focus = Math.min(n - 1, Math.max(0, state.focus + move));
    markFocus();
  } else if (ev.key === "Enter" && n) { openViewer(state.focus); }
  else if (ev.key === " " && n) { ev.preventDefault(); toggleSelect(state.items[state.focus].id); }
  else if (ev.key === "PageDown") { ev.preventDefault(); gotoPage(state.page + 1); }
  else if (ev.key === "PageUp") { ev.preventDefault(); gotoPage(state.page - 1); }
  else if ((ev.ctrlKey || ev.metaKey) && ev.key === "a") {
    ev.preventDefault();
    state.items.forEach((it) => toggleSelect(it.id, true));
  }
});

// ----- wiring ----------------------------------------------------------------------------------------------
function bind() {
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showView(b.dataset.view)));
  document.querySelectorAll(".modes button").forEach((b) => b.addEventListener("click", () => {
    state.viewerMode = b.dataset.mode; renderStage();
  }));
  $("#undo").addEventListener("click", undo);
  $("#tag-search").addEventListener("input", renderTagList);
  const simple = { "#f-status": "status", "#f-bucket": "bucket", "#f-mask": "mask", "#f-edited": "edited",
                   "#f-aside-step": "aside_step" };
  for (const [sel, key] of Object.entries(simple)) {
    $(sel).addEventListener("change", (ev) => { state.filter[key] = ev.target.value; filterChanged(); });
  }
  let timer = null;
  const typed = { "#f-text": "text", "#f-aside-reason": "aside_reason", "#f-dedupe": "dedupe" };
  for (const [sel, key] of Object.entries(typed)) {
    $(sel).addEventListener("input", (ev) => {
      clearTimeout(timer);
      timer = setTimeout(() => { state.filter[key] = ev.target.value.trim(); filterChanged(); }, 200);
    });
  }
  document.querySelectorAll('input[name="f-mode"]').forEach((r) => r.addEventListener("change", (ev) => {
    state.filter.mode = ev.target.value; filterChanged();
  }));
  $("#f-clear").addEventListener("click", () => {
    state.filter = emptyFilter();
    for (const sel of ["#f-text", "#f-aside-reason", "#f-dedupe"]) $(sel).value = "";
    for (const [sel, key] of Object.entries(simple)) $(sel).value = state.filter[key];
    document.querySelector('input[name="f-mode"][value="and"]').checked = true;
    document.querySelectorAll("#f-subsets input").forEach((c) => { c.checked = false; });
    filterChanged();
  });
  $("#sel-page").addEventListener("click", () => state.items.forEach((it) => toggleSelect(it.id, true)));
  $("#sel-all").addEventListener("click", async () => {
    try {
      const data = await getJSON(`/api/ids?${filterQuery()}`);
      data.ids.forEach((id) => state.selected.add(id));
      renderGrid();
    } catch (e) { say(e.message, true); }
  });
  $("#sel-none").addEventListener("click", () => { state.selected.clear(); renderGrid(); });
  $("#b-op").addEventListener("change", showOpFields);
  $("#b-apply").addEventListener("click", applyBatch);
  $("#v-close").addEventListener("click", closeViewer);
  $("#v-prev").addEventListener("click", () => viewerStep(-1));
  $("#v-next").addEventListener("click", () => viewerStep(1));
  const one = () => ({ ids: [state.viewer.id] });
  $("#v-save-caption").addEventListener("click", () => edit({ op: "replace_caption", caption: $("#v-caption").value, target: one() }, "caption"));
  const addTag = (position) => {
    const tag = $("#v-add-tag").value.trim();
    if (tag) edit({ op: "add_tag", tag, position, target: one() }, "add").then(() => { $("#v-add-tag").value = ""; });
  };
  $("#v-add-front").addEventListener("click", () => addTag("front"));
  $("#v-add-end").addEventListener("click", () => addTag("end"));
  $("#v-move").addEventListener("click", () => edit({ op: "move_subset", subset: $("#v-subset").value, target: one() }, "move"));
  $("#v-exclude").addEventListener("click", () => edit({ op: "exclude", target: one() }, "exclude"));
  $("#v-restore").addEventListener("click", () => edit({ op: "restore", target: one() }, "restore"));
  $("#v-mask-accept").addEventListener("click", () => edit({ op: "mask", verdict: "accept", target: one() }, "mask"));
  $("#v-mask-reject").addEventListener("click", () => edit({ op: "mask", verdict: "reject", target: one() }, "mask"));
  $("#aside-step").addEventListener("change", renderAside);
  $("#mask-which").addEventListener("change", renderMasks);
  $("#mask-opacity").addEventListener("input", () => {
    document.querySelectorAll("img.mask").forEach((m) => { m.style.opacity = $("#mask-opacity").value / 100; });
  });
  for (const sel of ["#batch-size", "#epochs"]) $(sel).addEventListener("input", renderStats);
  showOpFields();
}

bind();
loadSummary().then(() => loadPage()).catch((e) => say(e.message, true));
