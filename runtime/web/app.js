// The web chat page of `medgemma-gguf serve`: talks only to this server's own OpenAI endpoints
// (POST /v1/chat/completions, streamed) and to /api/presets and /api/thumbnail. No other requests.
// Images go as image_url items; CT/MR volumes and pathology slides as the server's study items
// ({"type": "volume"|"slide", "data": <data URI>, ...}, runtime/studies.py), laid out for a task preset as
// runtime.studies.task_layout does (instruction, the study, the question or the user's text).
"use strict";

const KEY_STORAGE = "medgemma-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  messages: [],        // the conversation sent with each turn: {role, content}
  attachments: [],     // pending items for the next message: {kind, name, uri, thumbnail?, count?}
  controller: null,    // AbortController of the reply being streamed
  presets: [],
  model: "",
  maxImages: null,
  maxBodyBytes: null,  // the server's request body limit (serve --max-body-bytes)
};

// study files the page sends as the server's study items; anything else is an image
const STUDIES = {
  volume: { pattern: /\.(zip|nii|nii\.gz)$/i, label: "CT/MR volume", count: "slices", countLabel: "Slices",
            files: "a .zip of a DICOM series, a .nii or a .nii.gz file" },
  slide: { pattern: /\.(svs|tiff?|ndpi)$/i, label: "pathology slide", count: "patches", countLabel: "Patches",
           files: "an .svs, .tif, .tiff or .ndpi slide" },
};
const INPUT_WORDS = { volume: "a CT/MR volume", slide: "a pathology slide", longitudinal: "two images (prior, then current)" };

function megabytes(bytes) {
  return bytes < 1024 ** 2 ? `${Math.ceil(bytes / 1024)} KB` : `${(bytes / 1024 ** 2).toFixed(1)} MB`;
}

function base64Size(bytes) {  // what a file becomes in the request: a base64 data URI
  return Math.ceil(bytes / 3) * 4 + 64;
}

function showError(text) {  // one line under the message box, read out by screen readers
  $("composer-error").textContent = text;
  $("composer-error").hidden = !text;
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers() {
  const result = { "Content-Type": "application/json" };
  if (apiKey()) result.Authorization = `Bearer ${apiKey()}`;
  return result;
}

function setStatus(text) {
  $("status").textContent = text;
}

// --- API key ---------------------------------------------------------------------------------------------
let keyWaiters = [];

function askForKey(reason) {
  $("key-reason").textContent = reason || "This server needs an API key.";
  $("key-input").value = apiKey();
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-dialog").addEventListener("close", () => {
  if ($("key-dialog").returnValue === "save") {
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
  }
  const saved = $("key-dialog").returnValue === "save";
  keyWaiters.forEach((resolve) => resolve(saved));
  keyWaiters = [];
});

$("key-button").addEventListener("click", () => askForKey("Enter the key this server was started with (serve --api-key)."));

async function request(path, options, retry = true) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (response.status === 401 && retry) {
    const saved = await askForKey("This server needs an API key (Authorization: Bearer KEY).");
    if (saved) return request(path, options, false);
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

// --- presets and settings --------------------------------------------------------------------------------
async function loadPresets() {
  const response = await request("/api/presets", { method: "GET" });
  if (!response.ok) {
    setStatus(`could not read the server's settings: ${await errorText(response)}`);
    return;
  }
  const info = await response.json();
  $("model-name").textContent = info.model + (info.vision ? "" : " (text only)");
  state.model = info.model;
  state.presets = info.presets;
  state.maxImages = info.max_images;
  state.maxBodyBytes = info.max_body_bytes || null;
  const select = $("preset");
  select.replaceChildren(new Option("None", ""));
  for (const preset of info.presets) {
    if (preset.input && !info.vision) continue;  // task presets need images
    const option = new Option(preset.input ? `${preset.name} (${INPUT_WORDS[preset.input] || preset.input})` : preset.name,
                              preset.name);
    option.title = preset.description;
    select.append(option);
  }
  $("max-tokens").max = String(info.max_tokens_limit);
  if (Number($("max-tokens").value) > info.max_tokens_limit) $("max-tokens").value = String(info.max_tokens_limit);
  $("file-input").disabled = !info.vision;
  setStatus("ready");
}

function currentPreset() {
  return state.presets.find((p) => p.name === $("preset").value) || null;
}

$("preset").addEventListener("change", () => {
  const preset = currentPreset();
  $("system").value = preset && preset.system ? preset.system : "";
  let hint = "";
  if (preset && preset.input) {
    const files = STUDIES[preset.input] ? `: attach ${STUDIES[preset.input].files}` : "";
    hint = `Takes ${INPUT_WORDS[preset.input] || preset.input}${files}. `
      + (preset.prompt_hint ? `Type ${preset.prompt_hint} as the message.`
        : "Your message replaces the notebook's question; leave it empty to ask that question.");
  }
  $("preset-hint").textContent = hint;
  $("preset-hint").hidden = !hint;
});

$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = $("temperature").value;
});

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function samplingFields() {
  const fields = { temperature: Number($("temperature").value) };
  const optional = { top_p: "top-p", top_k: "top-k", max_tokens: "max-tokens", seed: "seed" };
  for (const [name, id] of Object.entries(optional)) {
    const value = numberField(id);
    if (value !== undefined && !Number.isNaN(value)) fields[name] = value;
  }
  if ($("think").checked) fields.reasoning_effort = "medium";
  return fields;
}

// --- attachments -----------------------------------------------------------------------------------------
function readAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function isDicom(file) {
  return /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom" || file.type === "";
}

function studyKind(file) {
  return Object.keys(STUDIES).find((kind) => STUDIES[kind].pattern.test(file.name)) || null;
}

function tooLarge(file) {  // checked before the file is read: the server would answer 413
  if (!state.maxBodyBytes || base64Size(file.size) <= state.maxBodyBytes) return "";
  return `${file.name} is too large: ${megabytes(file.size)} is ${megabytes(base64Size(file.size))} as base64 and `
    + `this server accepts at most ${megabytes(state.maxBodyBytes)} per request (serve --max-body-bytes)`;
}

async function attachStudy(file, kind) {
  const uri = await readAsDataUri(file);
  const study = STUDIES[kind];
  const suffix = kind === "slide" ? file.name.slice(file.name.lastIndexOf(".")).toLowerCase() : null;
  state.attachments.push({
    kind, name: file.name, uri, bytes: file.size, count: null,
    content() {
      const item = { type: kind, data: this.uri };
      if (this.count) item[study.count] = this.count;
      if (suffix) item.suffix = suffix;
      return item;
    },
  });
  const match = state.presets.find((p) => p.input === kind);
  if ($("preset").value === "" && match) {  // the notebook's layout for this input, unless a preset is chosen
    $("preset").value = match.name;
    $("preset").dispatchEvent(new Event("change"));
  }
  renderAttachments();
}

async function attach(file) {
  const large = tooLarge(file);
  if (large) throw new Error(large);
  const kind = studyKind(file);
  if (kind) return attachStudy(file, kind);
  let uri = await readAsDataUri(file);
  const dicom = isDicom(file) && !/^image\/(png|jpeg)$/.test(file.type);
  if (dicom) uri = uri.replace(/^data:[^;,]*/, "data:application/dicom");
  let thumbnail = uri;
  if (dicom) {  // a browser cannot show DICOM: the server renders a small PNG of it
    const response = await request("/api/thumbnail", { method: "POST", body: JSON.stringify({ image: uri }) });
    if (!response.ok) throw new Error(`${file.name}: ${await errorText(response)}`);
    thumbnail = (await response.json()).thumbnail;
  }
  state.attachments.push({
    kind: "image", name: file.name, uri, thumbnail,
    content() { return { type: "image_url", image_url: { url: this.uri } }; },
  });
  renderAttachments();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  state.attachments.forEach((item, index) => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = item.name;
    if (STUDIES[item.kind]) {
      li.className = "study";
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = `${STUDIES[item.kind].label}, ${megabytes(item.bytes)}`;
      const count = document.createElement("input");
      count.type = "number";
      count.min = "1";
      count.step = "1";
      count.className = "count";
      count.placeholder = "default";
      count.value = item.count || "";
      count.title = `${STUDIES[item.kind].countLabel} to send (empty: the server's default)`;
      count.setAttribute("aria-label", `${STUDIES[item.kind].countLabel} of ${item.name}`);
      count.addEventListener("input", () => {
        const value = Number(count.value);
        item.count = Number.isInteger(value) && value > 0 ? value : null;
      });
      const label = document.createElement("label");
      label.textContent = `${STUDIES[item.kind].countLabel} `;
      label.append(count);
      li.append(kind, name, label);
    } else {
      const img = document.createElement("img");
      img.src = item.thumbnail;
      img.alt = `attached: ${item.name}`;
      li.append(img, name);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      renderAttachments();
      $("file-input").focus();
    });
    li.append(remove);
    list.append(li);
  });
}

$("file-input").addEventListener("change", async () => {
  const files = Array.from($("file-input").files);
  $("file-input").value = "";
  showError("");
  for (const file of files) {
    try {
      await attach(file);
      setStatus(`attached ${file.name}`);
    } catch (error) {
      setStatus(`not attached: ${file.name}`);
      showError(`Not attached: ${error.message}`);
    }
  }
});

// --- conversation ----------------------------------------------------------------------------------------
function messageElement(role) {
  const element = document.createElement("article");
  element.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "MedGemma";
  element.append(label);
  $("conversation").append(element);
  return element;
}

function showUser(text, attachments) {
  const element = messageElement("user");
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  element.append(content);
  if (attachments.length) {
    const images = document.createElement("div");
    images.className = "images";
    for (const item of attachments) {
      if (STUDIES[item.kind]) {
        const chip = document.createElement("span");
        chip.className = "study";
        chip.textContent = `${STUDIES[item.kind].label}: ${item.name}`;
        images.append(chip);
        continue;
      }
      const img = document.createElement("img");
      img.src = item.thumbnail;
      img.alt = item.name;
      images.append(img);
    }
    element.append(images);
  }
  element.scrollIntoView({ block: "end" });
}

function assistantView() {
  const element = messageElement("assistant");
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const thought = document.createElement("div");
  reasoning.append(summary, thought);
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  const stats = document.createElement("span");
  stats.className = "stats";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.className = "copy";
  copy.disabled = true;
  copy.addEventListener("click", () => copyText(content.textContent, copy));
  meta.append(stats, copy);
  element.append(reasoning, content, meta);
  return { element, reasoning, thought, content, stats, copy };
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {  // without clipboard permission: the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  setStatus(busy ? "generating…" : "ready");
}

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

function textItems(text) {
  return text ? [{ type: "text", text }] : [];
}

// A later question about the study already in the conversation: plain text, outside the preset's layout.
function isFollowUp(attachments) {
  return attachments.length === 0 && state.messages.length > 0;
}

// What a task preset needs; "" when the message fits it.
function presetProblem(preset, text, attachments) {
  if (!preset || !preset.input || isFollowUp(attachments)) return "";
  const kinds = attachments.map((a) => a.kind);
  const want = preset.input === "longitudinal" ? ["image", "image"] : [preset.input];
  if (kinds.length !== want.length || kinds.some((k, i) => k !== want[i])) {
    const files = STUDIES[preset.input] ? ` (${STUDIES[preset.input].files})` : "";
    return `preset ${preset.name} takes ${INPUT_WORDS[preset.input] || preset.input}${files} and nothing else; `
      + "attach it, or choose another preset";
  }
  if ((preset.instruction || "").includes("{prompt}") && !text) {
    return `preset ${preset.name} needs ${preset.prompt_hint || "a prompt"}: type it as the message`;
  }
  return "";
}

// The user turn's content, in the layout of runtime.studies (task_layout, volume_messages, slide_messages).
function turnContent(preset, text, attachments) {
  const items = attachments.map((a) => a.content());
  if (preset && preset.input && !isFollowUp(attachments)) {
    let before = preset.instruction || "";
    let after = preset.question || "";
    if (before.includes("{prompt}")) before = before.replaceAll("{prompt}", text);
    else if (text) after = text;
    const body = preset.input === "longitudinal"
      ? [{ type: "longitudinal", prior: attachments[0].uri, current: attachments[1].uri }] : items;
    return [...textItems(before), ...body, ...textItems(after)];
  }
  if (!items.length) return text;
  if (attachments.some((a) => a.kind === "volume")) return [...items, ...textItems(text)];  // slices, then the question
  return [...textItems(text), ...items];
}

async function send(text) {
  const preset = currentPreset();
  const problem = presetProblem(preset, text, state.attachments);
  if (problem) {
    showError(problem);
    return false;
  }
  const turn = { role: "user", content: turnContent(preset, text, state.attachments) };
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.messages, turn];
  const payload = JSON.stringify({ model: state.model || "medgemma", messages, stream: true,
                                   stream_options: { include_usage: true }, ...samplingFields() });
  const size = new Blob([payload]).size;
  if (state.maxBodyBytes && size > state.maxBodyBytes) {
    showError(`The message is too large: ${megabytes(size)} with the conversation so far, and this server accepts `
      + `at most ${megabytes(state.maxBodyBytes)} per request (serve --max-body-bytes); remove a file or start a `
      + "new chat");
    return false;
  }
  showError("");
  const attachments = state.attachments.splice(0);
  renderAttachments();
  showUser(text, attachments);
  const view = assistantView();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  let timings = null;
  let finish = null;
  let stopped = false;
  try {
    const response = await request("/v1/chat/completions", { method: "POST", signal: controller.signal, body: payload });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of serverEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.timings) timings = chunk.timings;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) {
          view.reasoning.hidden = false;
          view.thought.textContent += delta.reasoning_content;
        }
        if (delta.content) {
          if (firstAt === null) firstAt = performance.now();
          view.content.textContent += delta.content;
          view.element.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      stopped = true;
    } else {
      const message = document.createElement("div");
      message.className = "error";
      message.textContent = `Error: ${error.message}`;
      view.element.append(message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} reply tokens`);
  if (timings && timings.decode_tokens_per_s) parts.push(`${timings.decode_tokens_per_s.toFixed(1)} tokens/s`);
  else if (firstAt !== null) parts.push(`${((performance.now() - started) / 1000).toFixed(1)} s`);
  if (stopped) parts.push("stopped");
  else if (finish === "length") parts.push("cut at the token limit");
  view.stats.textContent = parts.join(" · ");
  view.copy.disabled = !view.content.textContent;
  if (view.content.textContent || view.thought.textContent) {
    state.messages.push(turn, { role: "assistant", content: view.content.textContent });
  }
  $("message").focus();
  return true;
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  const preset = currentPreset();
  const asksItsQuestion = preset && preset.input && preset.question && state.attachments.length;
  if ((!text && !asksItsQuestion) || state.controller) return;
  $("message").value = "";
  if (!(await send(text))) $("message").value = text;  // not sent: keep what was typed
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

function stop() {
  if (state.controller) state.controller.abort();
}

$("stop").addEventListener("click", stop);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller && !$("key-dialog").open) stop();
});

$("new-chat").addEventListener("click", () => {
  stop();
  state.messages = [];
  state.attachments = [];
  renderAttachments();
  showError("");
  $("conversation").replaceChildren();
  $("message").focus();
});

loadPresets();
