// The page at /ui: try the server (a file or the microphone) and watch its memory planner.
// Plain ES module, no build step: it only calls the public API, as any client would.

const $ = (selector) => document.querySelector(selector);
const KEY_STORE = "whisper-api-key";
const POLL_MS = 2000;
const HISTORY_MS = 5 * 60 * 1000;

// ---- the API ---------------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** An error from the API's envelope, said so that a person knows what to do. */
class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const error = (body && body.error) || {};
    const head = `Error${status ? ` ${status}` : ""}${error.code ? ` (${error.code})` : ""}`;
    let message = `${head}: ${error.message || "the server answered with an error."}`;
    if (status === 401) message += " Type the server's API key at the top of the page.";
    if (retryAfter) message += ` Try again in ${Math.ceil(Number(retryAfter))} s.`;
    super(message);
    this.status = status;
    this.code = error.code;
  }
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not our envelope (a proxy's page, say): the status alone must do.
  }
  return new ApiError(response.status, body, response.headers.get("Retry-After"));
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i && Math.abs(n) < 10 ? 1 : 0)} ${units[i]}`;
}

function clock(seconds, sep = ".") {
  const ms = Math.round(seconds * 1000);
  const h = Math.floor(ms / 3600000);
  const m = Math.floor(ms / 60000) % 60;
  const s = Math.floor(ms / 1000) % 60;
  const pad = (v, w = 2) => String(v).padStart(w, "0");
  return `${pad(h)}:${pad(m)}:${pad(s)}${sep}${pad(ms % 1000, 3)}`;
}

/** 83.5 -> "1:23.50", for people (the downloads use clock()). */
function shortClock(seconds) {
  const m = Math.floor(seconds / 60);
  return `${m}:${(seconds - m * 60).toFixed(2).padStart(5, "0")}`;
}

function timeOfDay(epochSeconds) {
  return new Date(epochSeconds * 1000).toTimeString().slice(0, 8);
}

function showError(box, err) {
  box.textContent = err.message;
  box.hidden = false;
}

function save(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---- the API key -----------------------------------------------------------------------------

$("#api-key").value = sessionStorage.getItem(KEY_STORE) || "";
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  loadModels();
  poll();
});

async function loadModels() {
  try {
    const list = await (await api("/v1/models")).json();
    const select = $("#model");
    const chosen = select.value;
    select.replaceChildren(...list.data.map((m) => el("option", { value: m.id, text: m.id })));
    if (list.data.some((m) => m.id === chosen)) select.value = chosen;
  } catch (err) {
    showError($("#error"), err);
  }
}

// ---- the audio: a file or the microphone -----------------------------------------------------

let audio = null; // {blob, name}: what will be sent
let recorder = null;

function useAudio(blob, name) {
  audio = { blob, name };
  $("#result").hidden = true; // it was the transcript of other audio
  const preview = $("#preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
}

$("#file").addEventListener("change", () => {
  const file = $("#file").files[0];
  if (file) {
    useAudio(file, file.name);
    $("#record-status").textContent = "";
  }
});

/** The microphone's stream, or null after saying why not. `api` is what the caller needs besides
 * getUserMedia (MediaRecorder, AudioContext); `cannot` finishes "This browser ..." without it. */
async function microphone(api, cannot) {
  if (!navigator.mediaDevices || !api) {
    showError($("#error"), new Error(`This browser ${cannot} (it needs HTTPS or localhost).`));
    return null;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    $("#error").hidden = true;
    return stream;
  } catch (err) {
    showError($("#error"), new Error(`The microphone is not available: ${err.message}`));
    return null;
  }
}

function recordingType() {
  // Opus in WebM is what Chrome and Firefox record; Safari records MP4.
  for (const type of ["audio/webm;codecs=opus", "audio/webm", "audio/mp4"]) {
    if (window.MediaRecorder && MediaRecorder.isTypeSupported(type)) return type;
  }
  return "";
}

$("#record").addEventListener("click", async () => {
  const button = $("#record");
  const status = $("#record-status");
  if (recorder) {
    recorder.stop();
    return;
  }
  const stream = await microphone(window.MediaRecorder, "cannot record here");
  if (!stream) return;
  const type = recordingType();
  const chunks = [];
  recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  const started = performance.now();
  const timer = setInterval(() => {
    status.textContent = `Recording… ${((performance.now() - started) / 1000).toFixed(0)} s`;
  }, 250);
  recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
  recorder.addEventListener("stop", () => {
    clearInterval(timer);
    stream.getTracks().forEach((track) => track.stop());
    const mime = recorder.mimeType || type || "audio/webm";
    const blob = new Blob(chunks, { type: mime });
    const seconds = (performance.now() - started) / 1000;
    useAudio(blob, mime.includes("mp4") ? "recording.mp4" : "recording.webm");
    $("#file").value = "";
    status.textContent = `Recorded ${seconds.toFixed(1)} s (${bytes(blob.size)}, ${mime}).`;
    button.textContent = "Record from the microphone";
    button.setAttribute("aria-pressed", "false");
    recorder = null;
  });
  recorder.start(250);
  button.textContent = "Stop recording";
  button.setAttribute("aria-pressed", "true");
});

// ---- live captions: the Realtime API over a WebSocket -----------------------------------------

const LIVE_RATE = 24000; // audio/pcm, as OpenAI's Realtime API takes it
let live = null; // the session in progress: {ws, stop}

/** 16-bit little-endian PCM at LIVE_RATE, base64, from float samples at `rate`; `state.at` carries
 * the resampler's position (in input samples) from one buffer to the next. */
function pcm16(samples, rate, state) {
  const step = rate / LIVE_RATE;
  const count = Math.max(0, Math.ceil((samples.length - state.at) / step));
  const out = new Int16Array(count);
  for (let i = 0; i < count; i++) {
    const x = state.at + i * step;
    const j = Math.floor(x);
    const next = j + 1 < samples.length ? samples[j + 1] : samples[j];
    const value = samples[j] + (next - samples[j]) * (x - j);
    out[i] = Math.max(-32768, Math.min(32767, Math.round(value * 32767)));
  }
  state.at = state.at + count * step - samples.length;
  let text = "";
  const raw = new Uint8Array(out.buffer);
  for (let i = 0; i < raw.length; i += 0x8000) {
    text += String.fromCharCode(...raw.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function caption(id) {
  const list = $("#live-captions");
  let line = list.querySelector(`li[data-item="${CSS.escape(id)}"]`);
  if (!line) {
    line = el("li", { "data-item": id, class: "pending" });
    list.append(line);
  }
  return line;
}

function liveEvent(event, status) {
  switch (event.type) {
    case "session.created":
    case "session.updated":
      status.textContent = "Listening…";
      break;
    case "input_audio_buffer.speech_started":
      status.textContent = "Hearing speech…";
      caption(event.item_id);
      break;
    case "input_audio_buffer.speech_stopped":
      status.textContent = "Listening…";
      break;
    case "conversation.item.input_audio_transcription.delta":
      caption(event.item_id).textContent += event.delta;
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const line = caption(event.item_id);
      line.textContent = event.transcript; // the final decode is the text to keep
      line.className = "done";
      if (!event.transcript.trim()) line.remove();
      break;
    }
    case "conversation.item.input_audio_transcription.failed":
      caption(event.item_id).textContent = `(not transcribed: ${event.error.message})`;
      break;
    case "error":
      // Stopping between turns commits nothing: that is not the user's problem.
      if (event.error.code !== "input_audio_buffer_commit_empty") {
        showError($("#error"), new ApiError(0, { error: event.error }));
      }
      break;
    default:
      break;
  }
}

async function startLive() {
  const button = $("#live");
  const status = $("#live-status");
  const stream = await microphone(window.AudioContext, "cannot use the microphone here");
  if (!stream) return;
  // Browsers cannot set headers on a WebSocket: the key goes as a subprotocol, as OpenAI's do.
  const key = sessionStorage.getItem(KEY_STORE);
  const protocols = ["realtime", ...(key ? [`openai-insecure-api-key.${key}`] : [])];
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?intent=transcription`, protocols);
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  const tap = context.createScriptProcessor(4096, 1, 1);
  const state = { at: 0 };
  let ready = false;
  tap.onaudioprocess = (event) => {
    if (!ready || ws.readyState !== WebSocket.OPEN) return;
    const audio = pcm16(event.inputBuffer.getChannelData(0), context.sampleRate, state);
    ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio }));
  };
  source.connect(tap);
  tap.connect(context.destination); // it runs only when connected; it writes silence
  const list = $("#live-captions");
  list.replaceChildren();
  list.hidden = false;
  status.textContent = "Connecting…";
  button.textContent = "Stop live captions";
  button.setAttribute("aria-pressed", "true");

  let stopping = null;
  const finish = () => {
    tap.disconnect();
    source.disconnect();
    stream.getTracks().forEach((track) => track.stop());
    context.close();
    if (stopping) clearTimeout(stopping);
    button.textContent = "Live captions";
    button.setAttribute("aria-pressed", "false");
    list.querySelectorAll("li.pending:empty").forEach((line) => line.remove());
    live = null;
  };
  ws.addEventListener("open", () => {
    const language = $("#language").value.trim();
    ws.send(
      JSON.stringify({
        type: "session.update",
        session: {
          type: "transcription",
          audio: {
            input: {
              format: { type: "audio/pcm", rate: LIVE_RATE },
              transcription: { model: $("#model").value, ...(language ? { language } : {}) },
              turn_detection: { type: "server_vad", silence_duration_ms: 500 },
            },
          },
        },
      }),
    );
    ready = true;
  });
  ws.addEventListener("message", (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    liveEvent(event, status);
    if (stopping && !list.querySelector("li.pending")) ws.close(1000); // every line settled
  });
  ws.addEventListener("close", (event) => {
    if (!stopping && event.code !== 1000) {
      status.textContent = `The session ended (${event.code}${event.reason ? `: ${event.reason}` : ""}).`;
    } else {
      status.textContent = `Stopped: ${list.querySelectorAll("li.done").length} lines.`;
    }
    finish();
  });
  live = {
    stop() {
      // Stop listening; the line being spoken is committed and its text awaited (10 s at most).
      ready = false;
      status.textContent = "Finishing…";
      if (ws.readyState !== WebSocket.OPEN) {
        ws.close();
        return;
      }
      if (list.querySelector("li.pending")) ws.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
      stopping = setTimeout(() => ws.close(1000), 10000);
      if (!list.querySelector("li.pending")) ws.close(1000);
    },
  };
}

$("#live").addEventListener("click", () => (live ? live.stop() : startLive()));

// ---- transcribing ----------------------------------------------------------------------------

let result = null; // {format, body}: the last answer, for the downloads
let running = null; // the AbortController of the request in flight

function requestForm(format) {
  const form = new FormData();
  form.append("file", audio.blob, audio.name);
  form.append("model", $("#model").value);
  const language = $("#language").value.trim();
  if (language && $("#task").value === "transcribe") form.append("language", language);
  form.append("response_format", format);
  if (format === "verbose_json") {
    form.append("timestamp_granularities[]", "segment");
    if ($("#words").checked) form.append("timestamp_granularities[]", "word");
  }
  return form;
}

function endpoint() {
  return $("#task").value === "translate" ? "/v1/audio/translations" : "/v1/audio/transcriptions";
}

function setBusy(busy, phase = "") {
  $("#go").disabled = busy;
  $("#cancel").hidden = !busy;
  $("#progress").hidden = !busy;
  $("#phase").textContent = phase;
}

$("#cancel").addEventListener("click", () => running && running.abort());

$("#try-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#error").hidden = true;
  if (!audio) {
    showError($("#error"), new Error("Choose a file or record something first."));
    return;
  }
  const format = $("#format").value;
  const streamed = format === "json" || format === "text";
  running = new AbortController();
  const started = performance.now();
  const phase = streamed ? "Transcribing" : "Uploading and transcribing";
  const ticker = setInterval(() => {
    $("#phase").textContent = `${phase}… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  setBusy(true, `${phase}…`);
  clearResult();
  try {
    const form = requestForm(format);
    if (streamed) form.append("stream", "true");
    const response = await api(endpoint(), { method: "POST", body: form, signal: running.signal });
    if (streamed) await showStream(response, format);
    else await showAnswer(response, format);
    const took = ((performance.now() - started) / 1000).toFixed(1);
    setBusy(false, `Done in ${took} s.`);
  } catch (err) {
    setBusy(false, err.name === "AbortError" ? "Cancelled." : "");
    if (err.name !== "AbortError") showError($("#error"), err);
  } finally {
    clearInterval(ticker);
    running = null;
    poll(); // the planner's decision for this request is there now
  }
});

function clearResult() {
  result = null;
  $("#result").hidden = true;
  $("#transcript").replaceChildren();
  $("#raw").hidden = true;
  $("#words-hint").hidden = true;
  $("#segments-box").hidden = true;
  $("#degraded").hidden = true;
  // The result has its own player, beside the words it lights up.
  $("#preview").hidden = true;
  const player = $("#player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(audio.blob);
}

/** Read the server-sent events of ``stream=true`` and show each delta as it arrives. */
async function showStream(response, format) {
  $("#result").hidden = false;
  const transcript = $("#transcript");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (!data) continue; // a keep-alive comment
      const event = JSON.parse(data);
      if (event.type === "transcript.text.delta") {
        transcript.append(el("span", { class: "delta", text: event.delta }));
      } else if (event.type === "transcript.text.done") {
        const text = event.text;
        transcript.replaceChildren(el("p", { text }));
        showDegraded(event.x_whisper_degraded, null);
        const body = format === "json" ? JSON.stringify({ text }, null, 2) : text;
        result = { format, body, text };
      } else if (event.type === "error") {
        throw new ApiError(null, event, null);
      }
    }
  }
  if (!result) throw new Error("The stream ended before the transcript was done.");
}

async function showAnswer(response, format) {
  const header = response.headers.get("X-Whisper-Degraded");
  $("#result").hidden = false;
  if (format !== "verbose_json") {
    const body = await response.text();
    $("#raw").textContent = body;
    $("#raw").hidden = false;
    showDegraded(null, header);
    result = { format, body };
    return;
  }
  const body = await response.json();
  result = { format, body, verbose: body };
  showDegraded(body.x_whisper_degraded, header);
  showTimed(body);
  showSegments(body.segments || []);
}

function showDegraded(list, header) {
  const items = list && list.length
    ? list.map((d) => el("li", {}, el("strong", { text: d.kind }), `: ${d.reason}`))
    : (header ? header.split(",").map((kind) => el("li", { text: kind.trim() })) : []);
  $("#degraded-list").replaceChildren(...items);
  $("#degraded").hidden = items.length === 0;
}

// ---- the timed transcript --------------------------------------------------------------------

let timed = []; // [{start, end, node}] in time order

function showTimed(body) {
  const transcript = $("#transcript");
  const words = body.words || [];
  timed = [];
  if (words.length === 0) {
    transcript.replaceChildren(el("p", { text: body.text }));
    return;
  }
  const paragraph = el("p");
  for (const word of words) {
    const node = el("span", { class: "word", "data-start": word.start, text: word.word });
    paragraph.append(node, " ");
    timed.push({ start: word.start, end: word.end, node });
  }
  transcript.replaceChildren(paragraph);
  $("#words-hint").hidden = false;
}

function showSegments(segments) {
  const rows = segments.map((s, i) => {
    const seek = el("button", { type: "button", class: "seek", "data-start": s.start,
      "aria-label": `Play from ${s.start.toFixed(2)} s` }, shortClock(s.start));
    return el("tr", {}, el("td", { text: String(i + 1) }), el("td", {}, seek),
      el("td", { text: shortClock(s.end) }), el("td", { text: s.text.trim() }));
  });
  $("#segments tbody").replaceChildren(...rows);
  $("#segments-box").hidden = segments.length === 0;
}

function seek(seconds) {
  const player = $("#player");
  player.currentTime = seconds;
  player.play().catch(() => {}); // autoplay may be refused; the position is set all the same
}

$("#transcript").addEventListener("click", (event) => {
  const word = event.target.closest(".word");
  if (word) seek(Number(word.dataset.start));
});
$("#segments").addEventListener("click", (event) => {
  const button = event.target.closest(".seek");
  if (button) seek(Number(button.dataset.start));
});

let lit = null;
function highlight() {
  const t = $("#player").currentTime;
  // The last word that has started; words are in time order.
  let lo = 0;
  let hi = timed.length - 1;
  let found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (timed[mid].start <= t) {
      found = mid;
      lo = mid + 1;
    } else hi = mid - 1;
  }
  const word = found >= 0 && t <= timed[found].end + 0.3 ? timed[found].node : null;
  if (word === lit) return;
  if (lit) lit.classList.remove("now");
  if (word) word.classList.add("now");
  lit = word;
}

// timeupdate fires a few times a second; while playing, follow every frame instead.
$("#player").addEventListener("timeupdate", highlight);
$("#player").addEventListener("seeked", highlight);
$("#player").addEventListener("play", function follow() {
  highlight();
  if (!$("#player").paused) requestAnimationFrame(follow);
});

// ---- downloads -------------------------------------------------------------------------------

function cues(segments, vtt) {
  const sep = vtt ? "." : ",";
  const blocks = segments.map((s, i) => {
    const head = vtt ? "" : `${i + 1}\n`;
    return `${head}${clock(s.start, sep)} --> ${clock(s.end, sep)}\n${s.text.trim()}\n`;
  });
  return (vtt ? "WEBVTT\n\n" : "") + blocks.join("\n");
}

const EXTENSIONS = { txt: "text", srt: "srt", vtt: "vtt", json: "json" };

$(".downloads").addEventListener("click", async (event) => {
  const button = event.target.closest("[data-download]");
  if (!button || !result) return;
  const kind = button.dataset.download;
  const base = (audio.name.replace(/\.[^.]+$/, "") || "transcript");
  const name = `${base}.${kind}`;
  const verbose = result.verbose;
  if (verbose) {
    // Everything can be rendered from verbose_json: no second transcription.
    if (kind === "json") save(name, JSON.stringify(verbose, null, 2), "application/json");
    else if (kind === "txt") save(name, verbose.text.trim() + "\n", "text/plain");
    else save(name, cues(verbose.segments || [], kind === "vtt"), "text/plain");
    return;
  }
  // A streamed answer has the text; an srt or vtt answer is its own download.
  const have = kind === "txt" && result.text !== undefined ? result.text
    : (EXTENSIONS[kind] === result.format ? result.body : null);
  if (have !== null) {
    save(name, have, "text/plain");
    return;
  }
  // Anything else needs the segments: ask the server for that format.
  button.disabled = true;
  try {
    const response = await api(endpoint(), { method: "POST", body: requestForm(EXTENSIONS[kind]) });
    save(name, await response.text(), "text/plain");
  } catch (err) {
    showError($("#error"), err);
  } finally {
    button.disabled = false;
  }
});

// ---- watch it: memory over time, decisions, the queue ----------------------------------------

const history = new Map(); // device label -> [{t, free, others, reserved, resident, total}]
const SERIES = [
  ["free", "Free"],
  ["others", "Used by others"],
  ["reserved", "Reserved by us"],
  ["resident", "Resident weights"],
];
let lastReport = null;

let polling = null; // the timer of the next reading
let reading = false; // a reading is in flight: it schedules the next one itself

async function poll() {
  clearTimeout(polling);
  if (reading || document.hidden) return; // hidden: visibilitychange starts it again
  reading = true;
  try {
    const report = await (await api("/v1/memory")).json();
    $("#watch-error").hidden = true;
    showReport(report);
    $("#watch-status").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  } catch (err) {
    showError($("#watch-error"), err);
    if (err.status === 401) return; // wait for a key rather than knock every 2 s
  } finally {
    reading = false;
  }
  polling = setTimeout(poll, POLL_MS);
}

$("#zoom").addEventListener("change", () => lastReport && drawDevices(lastReport, false));

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) poll();
});

function showReport(report) {
  lastReport = report;
  $("#serving").textContent = report.device;
  $("#serving-why").textContent = report.device_reason || "";
  const requests = report.requests || {};
  $("#in-flight").textContent = requests.in_flight ?? "–";
  $("#max-queue").textContent = requests.max_queue ?? "–";
  $("#running").textContent = requests.running ?? "–";
  $("#waiting").textContent = requests.waiting_for_memory ?? "–";
  $("#queued-windows").textContent = requests.queued_windows ?? "–";

  drawDevices(report, true);

  $("#models tbody").replaceChildren(...report.models.map((m) => el("tr", {},
    el("td", { text: m.id }), el("td", { text: m.device }), el("td", { text: m.compute_type }),
    el("td", { text: bytes(m.weights_bytes) }), el("td", { text: m.cost_source }))));

  const c = report.counters;
  const kinds = Object.entries(c.degradations).map(([k, n]) => `${k} ${n}`).join(", ") || "none";
  $("#counters").textContent = `Since start: degradations ${kinds}; out-of-memory recoveries `
    + `${c.oom_recoveries}; waits ${c.waits}; refused for memory ${c.rejected}.`;
  const recent = report.recent_decisions.slice(-20).reverse();
  $("#decisions tbody").replaceChildren(...recent.flatMap(decisionRows));
}

/** One panel per device; ``sample`` adds this report's reading to the history. */
function drawDevices(report, sample) {
  const now = Date.now();
  const panels = [];
  for (const d of report.devices) {
    const label = `${d.device}:${d.index ?? 0}`;
    if (d.error) {
      panels.push(el("article", { class: "device" }, el("h3", { text: label }),
        el("p", { class: "error", text: d.error })));
      continue;
    }
    const points = history.get(label) || [];
    if (sample) {
      points.push({ t: now, total: d.total_bytes, free: d.free_bytes, others: d.others_bytes,
        reserved: d.reserved_bytes, resident: d.resident_bytes });
    }
    while (points.length && points[0].t < now - HISTORY_MS) points.shift();
    history.set(label, points);
    if (points.length) panels.push(devicePanel(label, d, points, now));
  }
  $("#devices").replaceChildren(...panels);
}

function decisionRows(d) {
  const shape = `${d.device} · batch ${d.batch_size} · beam ${d.beam_size} · ${d.chunk_length} s`
    + (d.word_timestamps ? " · words" : "");
  const changed = d.degradations.length > 0 || d.action !== "run";
  const outcome = d.action === "run" ? (d.outcome || "running") : `${d.action}: ${d.outcome || ""}`;
  const audioLength = d.audio_seconds != null ? `${d.audio_seconds.toFixed(1)} s of audio` : "";
  const row = el("tr", { class: changed ? "changed" : "" },
    el("td", { text: timeOfDay(d.at) }),
    el("td", {}, el("span", { class: "mono", text: d.request_id }), el("br"),
      el("small", { text: [d.model, d.task, audioLength].filter(Boolean).join(" · ") })),
    el("td", { text: shape }),
    el("td", {}, el("span", { class: `outcome ${d.outcome === "ok" ? "ok" : ""}`, text: outcome }),
      el("br"), el("small", { text: `waited ${d.waited_s.toFixed(1)} s` })));
  if (!changed) return [row];
  const why = d.degradations.map((kind, i) =>
    el("li", {}, el("strong", { text: kind }), d.reasons && d.reasons[i] ? `: ${d.reasons[i]}` : ""));
  if (d.reason) why.push(el("li", { text: d.reason }));
  return [row, el("tr", { class: "changed why" }, el("td"), el("td", { colspan: "3" }, el("ul", {}, ...why)))];
}

// ---- the chart (plain SVG) -------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const W = 600;
const H = 200;
const PAD = { left: 78, right: 8, top: 10, bottom: 26 };

function svg(tag, attrs = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function devicePanel(label, d, points, now) {
  const legend = el("ul", { class: "legend" }, ...SERIES.map(([key, name]) =>
    el("li", { class: `s-${key}` }, el("span", { class: "swatch", "aria-hidden": "true" }),
      `${name}: `, el("strong", { text: bytes(d[`${key}_bytes`]) }))));
  const description = `${label}, ${d.name}: ${SERIES.map(([key, name]) =>
    `${name.toLowerCase()} ${bytes(d[`${key}_bytes`])}`).join(", ")} of ${bytes(d.total_bytes)}.`;
  return el("article", { class: "device", "data-device": d.device },
    el("h3", {}, `${label} `, el("small", { text: `${d.name} · ${bytes(d.total_bytes)}` })),
    chart(points, now, description), legend);
}

function chart(points, now, description) {
  // Our share is small beside a whole device; zoomed, the other lines run off the top.
  const top = $("#zoom").checked
    ? Math.max(1 << 20, ...points.map((p) => 1.25 * Math.max(p.reserved, p.resident)))
    : Math.max(...points.map((p) => p.total));
  // The last five minutes, or since the page opened (a minute at least), so that a page just
  // opened shows its first points across the chart rather than in its last pixels.
  const span = Math.min(HISTORY_MS, Math.max(60000, now - points[0].t));
  const x = (t) => PAD.left + ((t - (now - span)) / span) * (W - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - v / top) * (H - PAD.top - PAD.bottom);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": description,
    class: "chart" });
  for (const f of [1, 0.75, 0.5, 0.25, 0]) {
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(top * f), y2: y(top * f),
      class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y(top * f) + 4, class: "tick", "text-anchor": "end" },
      bytes(top * f)));
  }
  const step = span > 120000 ? 60000 : 15000;
  for (let ago = 0; ago <= span; ago += step) {
    const anchor = ago === 0 ? "end" : (ago + step > span ? "start" : "middle");
    const label = ago === 0 ? "now" : (step === 60000 ? `−${ago / 60000} min` : `−${ago / 1000} s`);
    root.append(svg("text", { x: x(now - ago), y: H - 6, class: "tick", "text-anchor": anchor }, label));
  }
  const clip = `plot-${Math.random().toString(36).slice(2)}`;
  const area = svg("clipPath", { id: clip });
  area.append(svg("rect", { x: PAD.left, y: PAD.top, width: W - PAD.left - PAD.right,
    height: H - PAD.top - PAD.bottom }));
  root.append(area);
  for (const [key] of SERIES) {
    const path = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`);
    root.append(svg("path", { d: path.join(" "), class: `line s-${key}`, "clip-path": `url(#${clip})` }));
  }
  return root;
}

loadModels();
poll();
