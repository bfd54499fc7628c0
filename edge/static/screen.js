// Osteofy Edge — the technician's local screen (kiosk page, no external assets).
// Every text from the server is placed with textContent (never as HTML). The worklist and the
// device status are polled every 1.5 s, so new studies and results appear without a reload.
"use strict";
(() => {
  const POLL_MS = 1500;
  const CLASSES = ["normal", "osteopenia", "osteoporosis"];
  const NAMES = { normal: "Normal", osteopenia: "Osteopenia", osteoporosis: "Osteoporosis" };
  const T_MIN = -4.5;
  const T_MAX = 1.5;
  const state = {
    route: { view: "worklist" }, worklist: null, worklistText: "", result: null, token: 0,
    base: null, heat: {}, heatClass: null, opacity: 0.5, offline: false,
  };
  const $ = (id) => document.getElementById(id);

  // --- helpers ---------------------------------------------------------------------------------

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  async function api(method, url, body) {
    const opt = { method, headers: {}, cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      opt.headers["Content-Type"] = "application/json";
      opt.body = JSON.stringify(body);
    }
    const r = await fetch(url, opt);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const err = new Error((data && data.error) || `The device answered with error ${r.status}.`);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  function when(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return "";
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (d.toDateString() === new Date().toDateString()) return time;
    return `${d.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
  }

  const pct = (p) => `${Math.round(p * 100)} %`;
  const minus = (x) => x.toFixed(1).replace("-", "−");
  const go = (hash) => { if (location.hash === hash) render(); else location.hash = hash; };

  function seg(name, options, value, onchange, label) {
    const box = h("div", { class: "seg", role: "radiogroup", "aria-label": label });
    for (const [v, text] of options) {
      const input = h("input", { type: "radio", name, value: v, id: `${name}-${v || "none"}` });
      input.checked = String(value) === String(v);
      if (onchange) input.addEventListener("change", () => onchange(v));
      box.append(h("label", { class: "seg-opt", for: input.id }, input, h("span", {}, text)));
    }
    return box;
  }

  // --- device status ---------------------------------------------------------------------------

  function renderStatus(st) {
    const ms = st.models;
    const same = ms.every((m) => m.backend === ms[0].backend && m.precision === ms[0].precision);
    $("st-model").textContent = !ms.length ? "No model"
      : same ? `${ms.map((m) => `${m.name} ${m.version}`).join(", ")} · ${ms[0].backend} ${ms[0].precision}`
        : ms.map((m) => `${m.name} ${m.version} (${m.backend} ${m.precision})`).join(", ");
    const fell = ms.filter((m) => m.fallback);
    if (fell.length) $("st-model").textContent += " · GPU unavailable, screening on the CPU";
    $("st-model").title = fell.map((m) => `${m.name}: ${m.fallback}`).join("\n");
    const mq = $("st-mqtt");
    mq.textContent = st.mqtt.text;
    mq.className = `st st-${st.mqtt.state}`;
    if (st.mqtt.error) mq.title = st.mqtt.error;
    $("st-outbox").textContent = `Outbox ${st.outbox.depth}${st.outbox.alarm ? " ⚠ nearly full" : ""}`;
    $("st-outbox").className = st.outbox.alarm ? "st st-bad" : "st";
    const gb = st.disk_free_mb / 1000;
    $("st-disk").textContent = `Disk ${gb >= 1 ? `${gb.toFixed(1)} GB` : `${Math.round(st.disk_free_mb)} MB`} free`;
    showAlarms(st.alarms);
  }

  function showAlarms(list) {
    const box = $("alarms");
    box.replaceChildren(...list.map((a) => h("p", {}, h("strong", {}, "⚠ Alarm: "), a)));
    box.hidden = list.length === 0;
  }

  // --- worklist --------------------------------------------------------------------------------

  function row(it) {
    const at = it.at ? `${it.state === "waiting" || it.state === "screening" ? "Received " : ""}${when(it.at)}` : null;
    const sub = [it.details, at].filter(Boolean).join(" · ");
    const main = h("span", { class: "row-main" },
      h("span", { class: "row-title" }, it.label), sub ? h("span", { class: "row-sub" }, sub) : null);
    const pill = h("span", { class: `pill pill-${it.state}${it.class ? ` cls-${it.class}` : ""}` },
      it.state_text, it.refer ? h("span", { class: "pill-refer" }, " · refer for DXA") : null);
    const attrs = { class: `row row-${it.state}`, "data-state": it.state, "data-study": it.study };
    if (it.state === "done") {
      return h("button", { ...attrs, type: "button", "data-result-id": it.result_id,
        onclick: () => go(`#/result/${it.result_id}`) }, main, pill,
      h("span", { class: "chev", "aria-hidden": "true" }, "›"));
    }
    if (it.state === "rejected") {
      return h("div", attrs, main, pill, h("p", { class: "reason" },
        h("strong", {}, it.reason), " ", h("span", { class: "reason-detail" }, `(${it.reason_detail})`)));
    }
    return h("div", attrs, main, pill, h("span", { class: "chev", "aria-hidden": "true" }));
  }

  function renderWorklist() {
    const view = $("view");
    view.className = "view view-worklist";
    const items = state.worklist ? state.worklist.items : null;
    const top = view.scrollTop;
    const body = items === null ? h("p", { class: "empty" }, "Loading…")
      : items.length === 0 ? h("p", { class: "empty" }, "No studies yet. New X-rays appear here by themselves.")
        : h("ul", { class: "rows", id: "worklist" }, items.map((it) => h("li", {}, row(it))));
    view.replaceChildren(h("section", { class: "worklist" },
      h("div", { class: "topline" }, h("h1", {}, "Studies"),
        h("p", { class: "hint" }, "Tap a finished study to see its result.")), body));
    view.scrollTop = top;
  }

  // --- result ----------------------------------------------------------------------------------

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("The image could not be loaded."));
      img.src = url;
    });
  }

  function turbo(x) { // Google's Turbo colour map (polynomial fit), x in 0..1
    const c = (v) => Math.max(0, Math.min(255, Math.round(v)));
    return [
      c(34.61 + x * (1172.33 - x * (10793.56 - x * (33300.12 - x * (38394.49 - x * 14825.05))))),
      c(23.31 + x * (557.33 + x * (1225.33 - x * (3574.96 - x * (1073.77 + x * 707.56))))),
      c(27.2 + x * (3211.1 - x * (15327.97 - x * (27814 - x * (22569.18 - x * 6838.66))))),
    ];
  }
  const LUT = Array.from({ length: 256 }, (_, v) => turbo(v / 255));

  async function heatLayer(cls) {
    if (state.heat[cls]) return state.heat[cls];
    const img = await loadImage(state.result.images.heat[cls]);
    const c = document.createElement("canvas");
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height);
    const p = d.data;
    for (let i = 0; i < p.length; i += 4) {
      const v = p[i];
      const [r, g, b] = LUT[v];
      p[i] = r; p[i + 1] = g; p[i + 2] = b; p[i + 3] = v;
    }
    ctx.putImageData(d, 0, 0);
    state.heat[cls] = c;
    return c;
  }

  function draw() {
    const c = $("xray");
    const b = state.base;
    if (!c || !b) return;
    if (c.width !== b.naturalWidth || c.height !== b.naturalHeight) {
      c.width = b.naturalWidth;
      c.height = b.naturalHeight;
    }
    const ctx = c.getContext("2d");
    ctx.globalAlpha = 1;
    ctx.drawImage(b, 0, 0);
    const heat = state.heat[state.heatClass];
    if (heat && state.opacity > 0) {
      ctx.globalAlpha = state.opacity;
      ctx.drawImage(heat, 0, 0, c.width, c.height);
      ctx.globalAlpha = 1;
      if (state.heatClass === state.result.heatmap_class) { // rings: where the model looked most
        const s = Math.min(c.width, c.height);
        for (const pk of state.result.peaks.filter((q) => q.weight >= 0.5)) {
          ctx.beginPath();
          ctx.arc(pk.x * c.width, pk.y * c.height, s * 0.07, 0, 2 * Math.PI);
          ctx.lineWidth = Math.max(3, s / 150);
          ctx.strokeStyle = "#000";
          ctx.stroke();
          ctx.lineWidth = Math.max(1.5, s / 300);
          ctx.strokeStyle = "#fff";
          ctx.stroke();
        }
      }
    }
  }

  async function showHeat(cls) {
    state.heatClass = cls;
    const text = $("heat-text");
    if (text && state.result && state.result.heatmap_text) text.textContent = state.result.heatmap_text[cls];
    try { await heatLayer(cls); } catch (e) { /* the radiograph alone is still drawn */ }
    if (state.heatClass === cls) draw();
  }

  function imagePane(r) {
    const slider = h("input", { type: "range", id: "opacity", min: 0, max: 100, step: 5,
      value: Math.round(state.opacity * 100), "aria-label": "Heat map strength" });
    const out = h("output", { for: "opacity", id: "opacity-out" }, `${slider.value} %`);
    slider.addEventListener("input", () => {
      state.opacity = Number(slider.value) / 100;
      out.textContent = `${slider.value} %`;
      draw();
    });
    const options = CLASSES.map((c) => [c, NAMES[c]]);
    return h("div", { class: "imagepane" },
      h("div", { class: "canvasbox" },
        h("canvas", { id: "xray", class: "xray", role: "img",
          "aria-label": "The X-ray with the heat map of where the model looked" })),
      h("div", { class: "controls" },
        h("label", { class: "slider" }, h("span", {}, "Heat map"), slider, out),
        seg("heatclass", options, state.heatClass, showHeat, "Heat map of class")));
  }

  function probs(r) {
    return h("section", { class: "card" }, h("h2", {}, "How likely is each class"),
      r.probs.map((p) => {
        const fill = h("span", { class: `fill cls-${p.class}` });
        fill.style.width = pct(p.p).replace(" ", "");
        return h("div", { class: `prob${p.class === r.class ? " is-result" : ""}` },
          h("span", { class: "prob-label" }, p.label), h("span", { class: "bar" }, fill),
          h("span", { class: "prob-val" }, pct(p.p)));
      }));
  }

  function tscale(r) {
    const at = (t) => `${(100 * (Math.min(T_MAX, Math.max(T_MIN, t)) - T_MIN)) / (T_MAX - T_MIN)}%`;
    const band = (cls, lo, hi, text) => {
      const el = h("span", { class: `band cls-${cls}${r.tscore_band === cls ? " is-here" : ""}` }, text);
      el.style.left = at(lo);
      el.style.width = `calc(${at(hi)} - ${at(lo)})`;
      return el;
    };
    const marker = h("span", { class: "marker", "aria-hidden": "true" }, "▼");
    marker.style.left = at(r.tscore);
    const tick = (t) => { const el = h("span", { class: "tick" }, minus(t)); el.style.left = at(t); return el; };
    return h("section", { class: "card" }, h("h2", {}, "Estimated T-score (WHO scale)"),
      h("div", { class: "tscale" }, marker,
        band("osteoporosis", T_MIN, -2.5, "Osteoporosis"), band("osteopenia", -2.5, -1, "Osteopenia"),
        band("normal", -1, T_MAX, "Normal"), tick(-2.5), tick(-1)),
      h("p", { class: "tscore-text", id: "tscore-text" }, r.tscore_text));
  }

  function quality(r) {
    return h("section", { class: "card" }, h("h2", {}, "Quality checks"),
      r.flags.length
        ? h("ul", { class: "flags" }, r.flags.map((f) => h("li", { "data-flag": f.flag }, "⚠ ", f.text)))
        : h("p", { class: "ok" }, "✓ No quality problems found."));
  }

  function factors(r) {
    const list = (title, arrow, items) => items.length ? h("div", { class: "factors" }, h("h3", {}, title),
      h("ul", {}, items.map((f) => h("li", {}, `${arrow} ${f.label} (${f.strength})`)))) : null;
    const none = !r.factors.up.length && !r.factors.down.length;
    return h("section", { class: "card" }, h("h2", {}, "Clinical facts that moved the result"),
      list("Raised the risk", "▲", r.factors.up), list("Lowered the risk", "▼", r.factors.down),
      none ? h("p", {}, "No known clinical fact moved the result.") : null,
      r.missing.length ? h("p", { class: "missing" }, h("strong", {}, "Not known: "), r.missing.join(", ")) : null,
      h("button", { type: "button", id: "open-facts",
        class: r.superseded_by ? "secondary" : (r.missing.length ? "primary" : "secondary"),
        disabled: Boolean(r.superseded_by), onclick: () => go(`#/result/${r.result_id}/facts`) },
      r.missing.length ? "Add missing facts" : "Change clinical facts"));
  }

  function feedbackCard(r) {
    const last = [...r.feedback].reverse();
    const agree = (last.find((f) => f.agree !== null) || {}).agree;
    const dxa = (last.find((f) => f.dxa_tscore !== null) || {}).dxa_tscore;
    const msg = h("p", { class: "fb-msg", id: "fb-msg", role: "status" },
      agree === true ? "✓ Saved: the clinician agrees." : agree === false ? "✓ Saved: the clinician disagrees." : "",
      dxa !== undefined && dxa !== null ? ` DXA T-score ${minus(dxa)} saved.` : "");
    const send = async (body, button) => {
      button.disabled = true;
      try {
        await api("POST", `/api/results/${r.result_id}/feedback`, body);
        const fresh = await api("GET", `/api/results/${r.result_id}`);
        if (state.result && state.result.result_id === fresh.result_id) {
          state.result = fresh;
          $("feedback").replaceWith(feedbackCard(fresh));
        }
      } catch (e) {
        msg.textContent = `⚠ ${e.message}`;
        button.disabled = false;
      }
    };
    const btn = (id, text, value) => {
      const b = h("button", { type: "button", id, class: "secondary", "aria-pressed": agree === value ? "true" : "false" },
        agree === value ? `✓ ${text}` : text);
      b.addEventListener("click", () => send({ agree: value }, b));
      return b;
    };
    const input = h("input", { type: "number", id: "dxa", inputmode: "decimal", step: "0.1", min: "-8", max: "6",
      value: dxa !== undefined && dxa !== null ? dxa : "" });
    const save = h("button", { type: "button", id: "dxa-save", class: "secondary" }, "Save DXA");
    save.addEventListener("click", () => {
      const v = Number(input.value);
      if (input.value.trim() === "" || !Number.isFinite(v) || v < -8 || v > 6) {
        msg.textContent = "⚠ Enter the DXA T-score, a number between −8 and 6.";
        return;
      }
      send({ dxa_tscore: v }, save);
    });
    return h("section", { class: "card", id: "feedback" }, h("h2", {}, "Clinician: do you agree?"),
      h("div", { class: "buttons" }, btn("fb-agree", "Agree", true), btn("fb-disagree", "Disagree", false)),
      h("label", { class: "dxa" }, h("span", {}, "DXA T-score, when known"), input, save), msg);
  }

  function renderResult(r) {
    const view = $("view");
    view.className = "view view-result";
    const newer = r.superseded_by ? h("div", { class: "newer", role: "status" },
      h("p", {}, "A newer result exists for this study (screened again with more facts)."),
      h("button", { type: "button", class: "primary", id: "open-newer", onclick: () => go(`#/result/${r.superseded_by}`) },
        "Open the newer result")) : null;
    const verdict = h("div", { class: `verdict cls-${r.class}`, id: "verdict", "data-class": r.class },
      h("span", { class: "verdict-text" }, r.verdict),
      h("span", { class: `refer${r.refer ? " refer-yes" : ""}` }, r.refer ? `➜ ${r.refer_text}` : r.refer_text),
      h("span", { class: `answer${r.coherent ? "" : " answer-disagree"}`, id: "answer-text" }, r.answer_text));
    view.replaceChildren(h("section", { class: "result", "data-result-id": r.result_id },
      h("div", { class: "result-grid" }, imagePane(r),
        h("div", { class: "side" },
          h("div", { class: "topline" },
            h("button", { type: "button", class: "back", onclick: () => go("#/") }, "‹ Studies"),
            h("h1", {}, r.label)),
          h("p", { class: "notice", id: "notice", role: "note" },
            h("span", { class: "icon", "aria-hidden": "true" }, "⚠ "), r.notice),
          h("div", { class: "details", id: "details" }, newer, verdict,
            h("p", { class: "who" }, `${r.details} · ${when(r.created_at)}`),
            probs(r), tscale(r), quality(r), factors(r), feedbackCard(r),
            h("section", { class: "card" }, h("h2", {}, "About the heat map"),
              h("p", { class: "heat-text", id: "heat-text" }, (r.heatmap_text || {})[state.heatClass || r.heatmap_class] || ""),
              h("p", { class: "legend" }, "Blue: little weight, red: most weight. Rings mark where "
                + "the model looked most. Choose a class under the image to see its heat map.")),
            h("p", { class: "model" }, `Model: ${r.model}`))))));
    draw();
  }

  // --- clinical facts form ---------------------------------------------------------------------

  function renderFacts(r) {
    const view = $("view");
    view.className = "view view-facts";
    const error = h("div", { class: "error", id: "facts-error", role: "alert", hidden: true });
    const rows = r.form.map((f) => {
      const tag = f.missing ? h("span", { class: "tag tag-missing" }, "missing")
        : f.known ? h("span", { class: "tag" }, "known") : null;
      const legend = [h("span", { class: "fact-label" }, f.label), " ", tag];
      if (f.kind === "yesno") {
        const value = f.value === true ? "1" : f.value === false ? "0" : "";
        return h("fieldset", { class: "fact", "data-fact": f.name },
          h("legend", {}, legend), f.help ? h("p", { class: "help" }, f.help) : null,
          seg(`fact-${f.name}`, [["1", "Yes"], ["0", "No"], ["", f.known ? "Keep" : "Not known"]], value));
      }
      const cm = f.name === "height_m";
      const val = f.value === null || f.value === undefined ? "" : cm ? Math.round(f.value * 100) : f.value;
      const input = h("input", { type: "number", inputmode: "decimal", id: `fact-${f.name}`,
        min: cm ? 120 : 25, max: cm ? 220 : 250, step: cm ? 1 : 0.5, value: val,
        placeholder: f.known ? "Keep" : "" });
      return h("div", { class: "fact", "data-fact": f.name },
        h("label", { for: input.id }, legend),
        h("span", { class: "number" }, input, h("span", { class: "unit" }, cm ? "cm" : "kg")));
    });
    const submit = h("button", { type: "submit", class: "primary", id: "facts-submit" }, "Screen again with these facts");
    const form = h("form", { id: "facts-form", class: "facts-form", novalidate: true }, rows, error,
      h("div", { class: "actions" },
        h("button", { type: "button", class: "secondary", onclick: () => go(`#/result/${r.result_id}`) }, "Cancel"),
        submit));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const facts = {};
      const fail = (text) => { error.textContent = `⚠ ${text}`; error.hidden = false; };
      for (const f of r.form) {
        if (f.kind === "yesno") {
          const c = form.querySelector(`input[name="fact-${f.name}"]:checked`);
          if (c && c.value !== "") facts[f.name] = c.value === "1";
          continue;
        }
        const raw = $(`fact-${f.name}`).value.trim();
        if (raw === "") continue;
        const v = Number(raw.replace(",", "."));
        const cm = f.name === "height_m";
        const [lo, hi] = cm ? [120, 220] : [25, 250];
        if (!Number.isFinite(v) || v < lo || v > hi) {
          return fail(`${f.label} must be a number from ${lo} to ${hi} ${cm ? "cm" : "kg"}.`);
        }
        facts[f.name] = cm ? Math.round(v) / 100 : v;
      }
      if (Object.keys(facts).length === 0) return fail("Choose or enter at least one fact.");
      error.hidden = true;
      submit.disabled = true;
      submit.textContent = "Screening again…";
      try {
        const res = await api("POST", `/api/results/${r.result_id}/rescreen`, facts);
        go(`#/result/${res.result_id}`);
      } catch (e) {
        fail(e.message);
        submit.disabled = false;
        submit.textContent = "Screen again with these facts";
      }
    });
    view.replaceChildren(h("section", { class: "facts" },
      h("div", { class: "topline" },
        h("button", { type: "button", class: "back", onclick: () => go(`#/result/${r.result_id}`) }, "‹ Result"),
        h("h1", {}, `Clinical facts · ${r.label}`)),
      h("p", { class: "intro" }, "Add what you know; leave the rest. The X-ray is screened again with these facts."),
      form));
  }

  // --- routing and polling ---------------------------------------------------------------------

  function parseRoute() {
    const m = location.hash.match(/^#\/result\/([0-9a-f-]{36})(\/facts)?$/);
    return m ? { view: m[2] ? "facts" : "result", id: m[1] } : { view: "worklist" };
  }

  async function render() {
    const token = ++state.token;
    state.route = parseRoute();
    const view = $("view");
    if (state.route.view === "worklist") {
      renderWorklist();
      return;
    }
    let r;
    try {
      r = await api("GET", `/api/results/${state.route.id}`);
    } catch (e) {
      if (token !== state.token) return;
      view.replaceChildren(h("section", { class: "worklist" }, h("p", { class: "error" }, `⚠ ${e.message}`),
        h("button", { type: "button", class: "primary", onclick: () => go("#/") }, "Back to the studies")));
      return;
    }
    if (token !== state.token) return;
    if (!state.result || state.result.result_id !== r.result_id) {
      state.base = null;
      state.heat = {};
      state.heatClass = r.heatmap_class;
    }
    state.result = r;
    if (state.route.view === "facts") {
      renderFacts(r);
      return;
    }
    renderResult(r);
    try {
      if (!state.base) state.base = await loadImage(r.images.base);
      if (token !== state.token) return;
      await showHeat(state.heatClass);
    } catch (e) {
      const box = document.querySelector(".canvasbox");
      if (box) box.replaceChildren(h("p", { class: "error" }, "⚠ The X-ray image could not be loaded."));
    }
  }

  async function tick() {
    try {
      const [wl, st] = await Promise.all([api("GET", "/api/worklist"), api("GET", "/api/status")]);
      state.offline = false;
      renderStatus(st);
      const text = JSON.stringify(wl);
      if (text !== state.worklistText) {
        state.worklistText = text;
        state.worklist = wl;
        const route = state.route;
        if (route.view === "worklist") renderWorklist();
        else if (route.view === "result" && state.result && !state.result.superseded_by
          && wl.items.some((i) => i.supersedes === route.id)) render();
      }
    } catch (e) {
      state.offline = true;
      showAlarms(["This screen cannot reach the screening service. It keeps trying by itself."]);
    }
    setTimeout(tick, POLL_MS);
  }

  window.addEventListener("hashchange", render);
  document.addEventListener("DOMContentLoaded", () => { render(); tick(); });
})();
