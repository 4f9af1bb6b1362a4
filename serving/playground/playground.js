// Servable playground: calls this service's own predict and explain routes with the key typed in.
// The key is read from the input at each call and kept nowhere else (no storage, no URL).
"use strict";
(() => {
  const kind = document.body.dataset.kind;
  const $ = (id) => document.getElementById(id);
  const route = kind === "image" ? "classify" : "sentiment"; // relative: works behind the proxy's prefix
  const status = $("status");
  let busy = false;

  $("subtitle").textContent = kind === "image"
    ? "Image classifier: drop an image to see the top labels and which parts of the image drove the answer."
    : "Sentiment: type a sentence to see the label and which words drove the answer.";
  $(kind === "image" ? "image-input" : "text-input").hidden = false;

  function say(message, isError = false) {
    status.textContent = message;
    status.className = isError ? "error" : "";
    status.setAttribute("role", isError ? "alert" : "status");
  }

  async function call(path, init) {
    const key = $("api-key").value.trim();
    if (!key) throw new Error("Enter your API key first.");
    const headers = { ...(init.headers || {}), "x-api-key": key };
    const r = await fetch(path, { ...init, headers, method: "POST", cache: "no-store", credentials: "omit" });
    let body = null;
    try { body = await r.json(); } catch { /* not JSON: reported below */ }
    if (r.ok) return body;
    const detail = body && body.error ? body.error : r.statusText;
    if (r.status === 401) throw new Error("The API key was refused (401 unauthenticated): check it and try again.");
    if (r.status === 429) throw new Error(`Too many requests (429): ${detail}`);
    throw new Error(`The service answered ${r.status}: ${detail}`);
  }

  function bars(rows, model, unsure) {
    const box = $("bars");
    box.replaceChildren();
    for (const { label, probability } of rows) {
      const row = document.createElement("div");
      row.className = "bar";
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.setProperty("width", `${(100 * probability).toFixed(1)}%`);
      track.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = `${(100 * probability).toFixed(1)}%`;
      row.append(name, track, value);
      box.append(row);
    }
    $("model").textContent = model;
    $("unsure").hidden = !unsure;
    $("explanation").hidden = true;
    $("result").hidden = false;
  }

  function words(text, found) {
    const box = $("words");
    box.replaceChildren();
    const scale = Math.max(1e-9, ...found.map((w) => Math.abs(w.score)));
    let at = 0;
    for (const w of found) {
      box.append(document.createTextNode(text.slice(at, w.start)));
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = text.slice(w.start, w.end);
      const v = Math.max(-1, Math.min(1, w.score / scale));
      span.dataset.score = String(w.score);
      span.title = `score ${w.score.toFixed(4)}`;
      span.style.setProperty("background-color",
        v >= 0 ? `rgba(230, 40, 30, ${(0.6 * v).toFixed(3)})` : `rgba(30, 40, 230, ${(-0.5 * v).toFixed(3)})`);
      box.append(span);
      at = w.end;
    }
    box.append(document.createTextNode(text.slice(at)));
  }

  function explained(answer) {
    const e = answer.explanation;
    $("explained-label").textContent = `${e.label} (${(100 * e.probability).toFixed(1)}%)`;
    $("explanation").hidden = false;
  }

  // Predict, then explain the same input; shared by both pages. The caller has set `busy`; this
  // clears it, and says on the page what failed (a wrong key, a refused file), never throws.
  async function predictThenExplain({ init, predictUrl, explainUrl, working, explaining, showPrediction,
                                      showExplanation }) {
    try {
      say(working);
      showPrediction(await call(predictUrl, init));
      say(explaining);
      const answer = await call(explainUrl(), init);
      showExplanation(answer);
      explained(answer);
      say(`Done: ${answer.explanation.rows} model rows for the explanation.`);
    } catch (err) {
      say(err.message, true);
    } finally {
      busy = false;
    }
  }

  async function runImage(file) {
    if (busy) return;
    if (!file.type.startsWith("image/")) { say(`${file.name} is not an image file.`, true); return; }
    busy = true;
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    await predictThenExplain({
      init: { headers: { "content-type": file.type }, body: file },
      predictUrl: `${route}?top_k=5`,
      explainUrl: () => `${route}/explain?overlay=true&top_k=5&grid=${$("grid").value}`,
      working: "Classifying…",
      explaining: "Explaining (occlusion: the image re-scored with each patch masked)…",
      showPrediction: (predicted) => bars(predicted.predictions[0].top_k, predicted.model,
        predicted.predictions[0].below_threshold),
      showExplanation: (answer) => {
        $("heatmap").src = `data:image/png;base64,${answer.explanation.overlay_png}`;
        $("heatmap-figure").hidden = false;
        $("words-figure").hidden = true;
      },
    });
  }

  async function runText() {
    if (busy) return;
    const text = $("text").value;
    if (!text.trim()) { say("Type a sentence first.", true); return; }
    busy = true;
    $("run-text").disabled = true;
    await predictThenExplain({
      init: { headers: { "content-type": "application/json" }, body: JSON.stringify({ text }) },
      predictUrl: route,
      explainUrl: () => `${route}/explain`,
      working: "Analysing…",
      explaining: "Explaining (word occlusion: the text re-scored with each word removed)…",
      showPrediction: (predicted) => {
        const p = predicted.predictions[0];
        bars(Object.entries(p.scores).map(([label, probability]) => ({ label, probability }))
          .sort((a, b) => b.probability - a.probability), predicted.model, p.below_threshold);
      },
      showExplanation: (answer) => {
        words(text, answer.explanation.words);
        $("words-figure").hidden = false;
        $("heatmap-figure").hidden = true;
      },
    });
    $("run-text").disabled = false;
  }

  if (kind === "image") {
    const drop = $("drop");
    $("file").addEventListener("change", (ev) => { if (ev.target.files[0]) runImage(ev.target.files[0]); });
    drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      if (ev.dataTransfer.files[0]) runImage(ev.dataTransfer.files[0]);
    });
  } else {
    $("run-text").addEventListener("click", runText);
    $("text").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) runText(); });
  }
})();
