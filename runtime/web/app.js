// The web chat page of `medgemma-gguf serve`: talks only to this server's own OpenAI endpoints
// (POST /v1/chat/completions, streamed) and to /api/presets and /api/thumbnail. No other requests.
"use strict";

const KEY_STORAGE = "medgemma-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  messages: [],        // the conversation sent with each turn: {role, content}
  attachments: [],     // pending items for the next message: {kind, name, uri, thumbnail}
  controller: null,    // AbortController of the reply being streamed
  presets: [],
  model: "",
  maxImages: null,
};

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
  const select = $("preset");
  select.replaceChildren(new Option("None", ""));
  for (const preset of info.presets) {
    const option = new Option(preset.name, preset.name);
    option.title = preset.description;
    select.append(option);
  }
  $("max-tokens").max = String(info.max_tokens_limit);
  if (Number($("max-tokens").value) > info.max_tokens_limit) $("max-tokens").value = String(info.max_tokens_limit);
  $("file-input").disabled = !info.vision;
  setStatus("ready");
}

$("preset").addEventListener("change", () => {
  const preset = state.presets.find((p) => p.name === $("preset").value);
  $("system").value = preset ? preset.system : "";
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

async function attach(file) {
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
    const img = document.createElement("img");
    img.src = item.thumbnail;
    img.alt = `attached: ${item.name}`;
    const name = document.createElement("span");
    name.textContent = item.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      renderAttachments();
      $("file-input").focus();
    });
    li.append(img, name, remove);
    list.append(li);
  });
}

$("file-input").addEventListener("change", async () => {
  const files = Array.from($("file-input").files);
  $("file-input").value = "";
  for (const file of files) {
    try {
      await attach(file);
      setStatus(`attached ${file.name}`);
    } catch (error) {
      setStatus(`not attached: ${error.message}`);
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

async function send(text) {
  const attachments = state.attachments.splice(0);
  renderAttachments();
  const content = attachments.length
    ? [{ type: "text", text }, ...attachments.map((a) => a.content())]
    : text;
  const turn = { role: "user", content };
  showUser(text, attachments);
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.messages, turn];
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
    const response = await request("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      body: JSON.stringify({ model: state.model || "medgemma", messages, stream: true,
                             stream_options: { include_usage: true }, ...samplingFields() }),
    });
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
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.controller) return;
  $("message").value = "";
  send(text);
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
  $("conversation").replaceChildren();
  $("message").focus();
});

loadPresets();
