// faceray review page: plain JavaScript over the /v1/review/… routes (documented at /docs).
// Views are in the URL hash (#people, #person/<id>, #name/<name>, #suggest/<name>): a reload
// shows the same view from the labels log. The bearer token is asked once (on a 401) and kept
// in sessionStorage; thumbnails are fetched with it and shown as blob URLs.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
};

// ---------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(status, reason) { super(reason); this.status = status; }
}

function token() { return sessionStorage.getItem("faceray-token") || ""; }
function author() { return sessionStorage.getItem("faceray-author") || null; }

let tokenWait = null;
function askToken() {
  if (!tokenWait) {
    tokenWait = new Promise((resolve) => {
      const dlg = $("#token-dialog");
      $("#author-input").value = author() || "";
      $("#token-form").onsubmit = () => {
        sessionStorage.setItem("faceray-token", $("#token-input").value.trim());
        const who = $("#author-input").value.trim();
        if (who) sessionStorage.setItem("faceray-author", who); else sessionStorage.removeItem("faceray-author");
        tokenWait = null;
        resolve();
      };
      dlg.showModal();
    });
  }
  return tokenWait;
}

async function request(path, opts = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const headers = Object.assign({}, opts.headers || {});
    if (token()) headers["Authorization"] = "Bearer " + token();
    let body = opts.body;
    if (body !== undefined && typeof body !== "string") {
      body = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, { method: opts.method || "GET", headers, body });
    if (res.status === 401) { await askToken(); continue; }
    if (!res.ok) {
      let reason = res.statusText;
      try { const j = await res.json(); reason = j.error || reason; } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, reason);
    }
    return opts.raw ? res : res.json();
  }
  throw new ApiError(401, "the token was refused");
}

const api = (path) => request(path);
const post = (path, body) => request(path, { method: "POST", body: Object.assign({ author: author() }, body) });
const qs = (o) => new URLSearchParams(Object.entries(o).filter(([, v]) => v !== null && v !== undefined)).toString();

// ---------------------------------------------------------------- messages

function showError(err) {
  $("#error-text").textContent = (err.status ? `${err.status}: ` : "") + (err.message || String(err));
  $("#error").hidden = false;
}
function clearError() { $("#error").hidden = true; }
let noticeTimer = null;
function notice(text) {
  const n = $("#notice");
  n.textContent = text;
  n.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { n.hidden = true; }, 4000);
}
$("#error-close").addEventListener("click", clearError);

// An action: errors are shown and the user's selection and typing are kept; on success the
// progress and names are refreshed and `then` runs.
async function act(fn, then) {
  clearError();
  try {
    const out = await fn();
    notice(`saved: ${out.written} label${out.written === 1 ? "" : "s"} (${out.name})`);
    refreshSide();
    if (then) await then(out);
    return out;
  } catch (err) {
    showError(err);
    return null;
  }
}

// ---------------------------------------------------------------- thumbnails

const thumbQueue = [];
let thumbActive = 0;
const THUMB_PARALLEL = 6;
const thumbObserver = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (e.isIntersecting) { thumbObserver.unobserve(e.target); thumbQueue.push(e.target); }
  }
  pumpThumbs();
}, { rootMargin: "300px" });

function thumb(url, alt) {
  const img = el("img", { alt: alt || "", "data-src": url, width: 96, height: 96 });
  thumbObserver.observe(img);
  return img;
}
function pumpThumbs() {
  while (thumbActive < THUMB_PARALLEL && thumbQueue.length) {
    const img = thumbQueue.shift();
    if (!img.isConnected) continue;
    thumbActive++;
    request(img.dataset.src, { raw: true })
      .then((res) => res.blob())
      .then((blob) => { img.src = URL.createObjectURL(blob); img.dataset.loaded = "1"; })
      .catch(() => { img.dataset.loaded = "error"; })
      .finally(() => { thumbActive--; pumpThumbs(); });
  }
}

// ---------------------------------------------------------------- side: progress, names

async function refreshSide() {
  try {
    const [p, n] = await Promise.all([api("/v1/review/progress"), api("/v1/review/names")]);
    $("#progress").textContent = `${p.faces_named} of ${p.faces_named + p.faces_left} faces named · ` +
      `${p.people_named} people named · ${p.people_left} left (${p.people_left_2plus} with 2+ faces)`;
    const list = $("#names");
    list.replaceChildren(...n.names.map((x) => el("option", { value: x })));
  } catch (err) { showError(err); }
}

// ---------------------------------------------------------------- routing

function route() {
  const [view, ...rest] = decodeURIComponent(location.hash.slice(1) || "people").split("/");
  const arg = rest.join("/");
  clearError();
  keyHandler = null;
  if (view === "person") return personView({ person: arg });
  if (view === "name") return personView({ name: arg });
  if (view === "suggest") return suggestView(arg);
  if (view === "named" || view === "unnamed") return peopleView(view);
  return peopleView("all");
}
const hashOf = (p) => (p.name ? "#name/" + encodeURIComponent(p.name) : "#person/" + encodeURIComponent(p.person));
window.addEventListener("hashchange", route);

let keyHandler = null;
document.addEventListener("keydown", (ev) => {
  if (!keyHandler || ev.target.closest("input, textarea, dialog") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  keyHandler(ev);
});

// ---------------------------------------------------------------- people grid

async function peopleView(which) {
  const view = $("#view");
  const picked = new Map();   // key → ref of people selected for a merge
  const mergeName = el("input", { id: "merge-name", list: "names", placeholder: "name (needed for unnamed people)" });
  const mergeBtn = el("button", { id: "merge-btn", class: "primary", type: "button", disabled: true }, "Merge selected");
  const grid = el("div", { class: "grid", id: "people-grid" });
  const more = el("div", { class: "more", id: "people-more" }, "loading…");
  const tab = (w, label) => el("a", { href: "#" + (w === "all" ? "people" : w), class: "tab" + (w === which ? " on" : ""),
                                     id: "tab-" + w }, label);
  view.replaceChildren(
    el("h1", {}, "People ", tab("all", "all"), tab("unnamed", "to name"), tab("named", "named")),
    el("p", { class: "keys" }, "Unnamed people first (the work), then largest first. Open a person to name it; " +
      "tick two or more to merge them."),
    el("div", { class: "toolbar sticky" }, mergeName, mergeBtn), grid, more);
  const update = () => { mergeBtn.disabled = picked.size < 2; mergeBtn.textContent = `Merge selected (${picked.size})`; };
  mergeBtn.addEventListener("click", () => act(
    () => post("/v1/review/merge", { people: [...picked.values()], name: mergeName.value.trim() || null }),
    () => route()));

  let next = 0;
  let loading = false;
  async function loadMore() {
    if (loading || next === null) return;
    loading = true;
    try {
      const page = await api("/v1/review/people?" + qs({ offset: next, limit: 40, faces: 4, which }));
      for (const p of page.people) grid.append(card(p));
      next = page.next_offset;
      more.textContent = next === null ? `${page.total} ${which === "all" ? "" : which + " "}people` : "scroll for more…";
    } catch (err) { showError(err); more.textContent = ""; } finally { loading = false; }
  }
  function card(p) {
    const ref = p.name ? { name: p.name } : { person: p.person };
    const key = p.name ? "name:" + p.name : p.person;
    const box = el("input", { type: "checkbox", class: "pick-box" });
    const c = el("div", { class: "person-card", "data-person": p.person, "data-name": p.name || "", "data-size": p.size },
      el("div", { class: "title " + (p.name ? "named" : "unnamed") },
        el("a", { href: hashOf(ref), class: "open" }, p.name || p.person),
        el("span", { class: "size" }, `${p.size} face${p.size === 1 ? "" : "s"}`)),
      el("div", { class: "thumbs" }, p.faces.map((f) => thumb(f.thumbnail, p.name || p.person))),
      el("label", { class: "pick" }, box, " select"));
    box.addEventListener("change", () => {
      if (box.checked) picked.set(key, ref); else picked.delete(key);
      c.classList.toggle("selected", box.checked);
      update();
    });
    return c;
  }
  new IntersectionObserver((e) => { if (e[0].isIntersecting) loadMore(); }, { rootMargin: "400px" }).observe(more);
  await loadMore();
}

// ---------------------------------------------------------------- selectable face grid

function faceGrid(id, onKeys) {
  const root = el("div", { class: "faces", id });
  const grid = {
    root,
    selected() {
      return [...root.querySelectorAll(".face.selected")].map((b) => ({ image_uri: b.dataset.uri, face_index: +b.dataset.index }));
    },
    add(faces) {
      for (const f of faces) {
        const b = el("button", { type: "button", class: "face", "data-uri": f.image_uri, "data-index": f.face_index,
                                 title: `${f.image_uri} #${f.face_index}` },
          thumb(f.thumbnail, `${f.image_uri} #${f.face_index}`),
          el("span", { class: "sim" }, f.similarity.toFixed(3)));
        b.addEventListener("click", () => { b.classList.toggle("selected"); onKeys && onKeys(); });
        root.append(b);
      }
    },
    clear() { root.querySelectorAll(".face.selected").forEach((b) => b.classList.remove("selected")); onKeys && onKeys(); },
  };
  return grid;
}

// Arrow keys move between faces, Space / X toggles, A selects all, Esc clears.
function gridKeys(grid, extra) {
  return (ev) => {
    const faces = [...grid.root.querySelectorAll(".face")];
    if (!faces.length) return;
    let i = faces.indexOf(document.activeElement);
    const perRow = Math.max(1, Math.round(grid.root.clientWidth / (faces[0].offsetWidth + 6)));
    const move = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow }[ev.key];
    if (move !== undefined) {
      i = i < 0 ? 0 : Math.min(faces.length - 1, Math.max(0, i + move));
      faces[i].focus();
      ev.preventDefault();
    } else if ((ev.key === " " || ev.key === "x") && i >= 0) {
      faces[i].click();
      ev.preventDefault();
    } else if (ev.key === "a") {
      faces.forEach((b) => b.classList.add("selected"));
      extra.changed && extra.changed();
    } else if (ev.key === "Escape") {
      grid.clear();
    } else if (extra[ev.key]) {
      extra[ev.key]();
      ev.preventDefault();
    }
  };
}

// ---------------------------------------------------------------- one person

async function personView(ref) {
  const view = $("#view");
  let p;
  try {
    p = await api("/v1/review/person?" + qs({ ...ref, offset: 0, limit: 60 }));
  } catch (err) {
    view.replaceChildren(el("p", {}, el("a", { href: "#people" }, "← people")));
    showError(err);
    return;
  }
  const named = p.name !== null;
  const nameInput = el("input", { id: "name-input", list: "names", value: p.name || "", placeholder: "name" });
  const nameBtn = el("button", { id: "name-btn", class: "primary", type: "button" }, named ? "Rename" : "Name");
  const takeBtn = el("button", { id: "takeout-btn", type: "button", disabled: true }, "Take out selected (T)");
  const forgetBtn = el("button", { id: "forget-btn", type: "button" }, "Forget this name");
  const changed = () => { takeBtn.disabled = !grid.selected().length; };
  const grid = faceGrid("person-faces", changed);
  const more = el("button", { id: "faces-more", type: "button" }, "More faces");
  const title = named ? p.name : `Unnamed person ${p.person}`;
  view.replaceChildren(
    el("p", {}, el("a", { href: "#people" }, "← people")),
    el("h1", { id: "person-title" }, `${title} `, el("small", { class: "size", id: "person-size" }, `${p.size} faces`)),
    el("div", { class: "toolbar sticky" }, nameInput, nameBtn,
      named ? takeBtn : null, named ? forgetBtn : null,
      named ? el("a", { href: "#suggest/" + encodeURIComponent(p.name), id: "suggest-link" }, "Suggestions →") : null),
    el("p", { class: "keys" }, named
      ? ["Select faces that are not ", p.name, " (click, or ", el("kbd", {}, "←↑→↓"), " + ", el("kbd", {}, "Space"),
         ") and take them out with ", el("kbd", {}, "T"), ". Most typical faces first."]
      : "Give this person a name; its faces are saved to the labels log. Most typical faces first."),
    grid.root, more);
  grid.add(p.faces);
  let next = p.next_offset;
  more.hidden = next === null;
  more.addEventListener("click", async () => {
    try {
      const page = await api("/v1/review/person?" + qs({ ...ref, offset: next, limit: 60 }));
      grid.add(page.faces);
      next = page.next_offset;
      more.hidden = next === null;
    } catch (err) { showError(err); }
  });
  const doName = () => act(
    () => post("/v1/review/name", { ...ref, to: nameInput.value }),
    (out) => { if (location.hash === hashOf({ name: out.name })) route(); else location.hash = hashOf({ name: out.name }); });
  nameBtn.addEventListener("click", doName);
  nameInput.addEventListener("keydown", (ev) => { if (ev.key === "Enter") doName(); });
  const takeOut = () => {
    const faces = grid.selected();
    if (!faces.length) return;
    act(() => post("/v1/review/decide", { name: p.name, reject: faces }), () => route());
  };
  takeBtn.addEventListener("click", takeOut);
  forgetBtn.addEventListener("click", () => {
    if (!confirm(`Forget the name ${p.name} on every face?`)) return;
    act(() => post("/v1/review/forget", { name: p.name }), () => { location.hash = "#people"; });
  });
  if (named) keyHandler = gridKeys(grid, { t: takeOut, changed });
}

// ---------------------------------------------------------------- suggestions

async function suggestView(name) {
  const view = $("#view");
  let s;
  try {
    s = await api("/v1/review/suggestions?" + qs({ name, limit: 30, people: 6 }));
  } catch (err) {
    view.replaceChildren(el("p", {}, el("a", { href: "#people" }, "← people")));
    showError(err);
    return;
  }
  const confirmBtn = el("button", { id: "confirm-btn", class: "primary", type: "button" }, "Confirm selected (Y)");
  const rejectBtn = el("button", { id: "reject-btn", type: "button" }, "Reject selected (N)");
  const count = el("span", { id: "selected-count" }, "0 selected");
  const changed = () => { count.textContent = `${grid.selected().length} selected`; };
  const grid = faceGrid("suggested-faces", changed);
  grid.add(s.faces);
  const decide = (key) => {
    const faces = grid.selected();
    if (!faces.length) { showError(new ApiError(0, "select faces first (click, or arrows + Space; A: all)")); return; }
    act(() => post("/v1/review/decide", { name: s.name, [key]: faces }), () => route());
  };
  confirmBtn.addEventListener("click", () => decide("confirm"));
  rejectBtn.addEventListener("click", () => decide("reject"));
  const people = el("div", { class: "grid", id: "suggested-people" }, s.people.map((p) => el("div",
    { class: "person-card", "data-person": p.person },
    el("div", { class: "title unnamed" }, el("a", { href: hashOf(p) }, p.person),
      el("span", { class: "size" }, `${p.size} faces · ${p.similarity.toFixed(3)}`)),
    el("div", { class: "thumbs" }, p.faces.map((f) => thumb(f.thumbnail, p.person))),
    el("button", { type: "button", class: "merge-into", onclick: () => act(
      () => post("/v1/review/merge", { people: [{ name: s.name }, { person: p.person }] }), () => route()) },
    `Merge into ${s.name}`))));
  view.replaceChildren(
    el("p", {}, el("a", { href: hashOf({ name: s.name }) }, `← ${s.name}`)),
    el("h1", {}, `Is this ${s.name}?`),
    el("p", { class: "keys" }, "Unnamed faces nearest ", s.name, ", best first. Select with a click or ",
      el("kbd", {}, "←↑→↓"), " + ", el("kbd", {}, "Space"), " (", el("kbd", {}, "A"), " all, ", el("kbd", {}, "Esc"),
      " none), then ", el("kbd", {}, "Y"), " confirm or ", el("kbd", {}, "N"), " reject."),
    el("div", { class: "toolbar sticky" }, confirmBtn, rejectBtn, count),
    grid.root,
    s.people.length ? el("div", { class: "people-sugg" }, el("h2", {}, "Unnamed people near " + s.name), people) : null);
  keyHandler = gridKeys(grid, { y: () => decide("confirm"), n: () => decide("reject"), changed });
  const first = grid.root.querySelector(".face");
  if (first) first.focus();
}

// ---------------------------------------------------------------- start

refreshSide().then(route);
