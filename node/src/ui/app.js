// Gaia's web UI: talks to this node's own API. Four views, chosen by the URL's hash: the chat
// (/v1/models, /v1/chat/completions), the domain (/v1/info's members: their load and price,
// and which node served each answer of this page), the knowledge base (/v1/kb/documents: its
// documents and chunk counts, upload and removal) and settings (this browser's, and the
// node's facts from /v1/info).
//
// Model output is only ever written with textContent (never parsed as HTML), so nothing the model
// says can become markup or script. A light markdown pass splits ``` code fences into <pre>
// blocks; everything else is shown as plain text with its line breaks.
"use strict";

(() => {
  const KEY_STORAGE = "gaia.apiKey";
  const MODEL_STORAGE = "gaia.model";
  const MAX_EVENT_BYTES = 1 << 20; // one SSE event larger than this is a broken stream

  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"),
    apiKey: $("api-key"),
    system: $("system"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    clear: $("clear"),
    messages: $("messages"),
    status: $("status"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    domainSummary: $("domain-summary"),
    members: $("members"),
    membersBody: $("members-body"),
    served: $("served"),
    kbSummary: $("kb-summary"),
    kbUpload: $("kb-upload"),
    kbFile: $("kb-file"),
    documents: $("documents"),
    documentsBody: $("documents-body"),
    nodeFacts: $("node-facts"),
  };
  const VIEWS = ["chat", "domain", "knowledge", "settings"];

  /** The conversation so far, in OpenAI message format. */
  let history = [];
  /** The AbortController of the request in flight, if any. */
  let inFlight = null;

  function storageGet(key) {
    try {
      return window.localStorage.getItem(key) || "";
    } catch {
      return "";
    }
  }

  function storageSet(key, value) {
    try {
      if (value) window.localStorage.setItem(key, value);
      else window.localStorage.removeItem(key);
    } catch {
      // Storage may be disabled (private mode); the field still works for this page.
    }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function setStatus(text, isError) {
    els.status.textContent = text || "";
    els.status.classList.toggle("error", Boolean(isError));
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** The message of an OpenAI-style error body, or a fallback naming the HTTP status. */
  async function errorMessage(response) {
    let text = "";
    try {
      text = await response.text();
    } catch {
      // fall through to the status line
    }
    try {
      const body = JSON.parse(text);
      if (body && body.error) {
        return typeof body.error === "string" ? body.error : body.error.message || text;
      }
    } catch {
      // not JSON
    }
    const hint = response.status === 401 ? " (set the API key under Settings)" : "";
    return `HTTP ${response.status}${text ? ": " + text.slice(0, 500) : ""}${hint}`;
  }

  async function loadModels() {
    setStatus("loading models…");
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (e) {
      setStatus("cannot reach the node: " + e.message, true);
      return;
    }
    if (!response.ok) {
      setStatus("cannot list models: " + (await errorMessage(response)), true);
      return;
    }
    let body;
    try {
      body = await response.json();
    } catch {
      setStatus("the node sent an unreadable model list", true);
      return;
    }
    const models = Array.isArray(body && body.data) ? body.data : [];
    const wanted = storageGet(MODEL_STORAGE);
    els.model.replaceChildren();
    for (const m of models) {
      if (!m || typeof m.id !== "string") continue;
      // Embedding models cannot chat; the node may mark them (an extension), else show all.
      const kind = m.kind || m.type || (m.meta && m.meta.kind);
      if (kind === "embedding") continue;
      const option = el("option", "", m.id);
      option.value = m.id;
      els.model.append(option);
    }
    if (els.model.options.length === 0) {
      setStatus("this node serves no chat model", true);
      return;
    }
    if (wanted && [...els.model.options].some((o) => o.value === wanted)) {
      els.model.value = wanted;
    }
    setStatus("");
  }

  /** Renders text with ``` fences as <pre><code>, the rest as paragraphs, all via textContent. */
  function renderContent(container, text) {
    const parts = text.split("```");
    const nodes = [];
    parts.forEach((part, i) => {
      if (i % 2 === 1) {
        // Inside a fence: drop the language tag on the first line.
        const newline = part.indexOf("\n");
        const code = newline >= 0 && /^[\w+.-]*$/.test(part.slice(0, newline)) ? part.slice(newline + 1) : part;
        const pre = el("pre");
        pre.append(el("code", "", code));
        nodes.push(pre);
      } else {
        for (const para of part.split(/\n{2,}/)) {
          if (para.trim() !== "") nodes.push(el("p", "", para.replace(/^\n+|\n+$/g, "")));
        }
      }
    });
    container.replaceChildren(...nodes);
  }

  function addMessage(role, text) {
    const msg = el("div", "msg " + role);
    msg.append(el("div", "role", role));
    const content = el("div", "content");
    msg.append(content);
    renderContent(content, text);
    els.messages.append(msg);
    els.messages.scrollTop = els.messages.scrollHeight;
    return msg;
  }

  /** One assistant reply being streamed: text, tool calls, sources, usage. */
  class Reply {
    constructor() {
      this.msg = addMessage("assistant", "");
      this.msg.dataset.state = "streaming";
      this.content = this.msg.querySelector(".content");
      this.text = "";
      this.toolCalls = [];
      this.sources = null;
      this.toolResults = null;
      this.usage = null;
      this.finishReason = null;
      this.servedBy = null;
      this.scheduled = false;
    }

    appendText(delta) {
      this.text += delta;
      this.schedule();
    }

    addToolCallDelta(delta) {
      const index = Number.isInteger(delta.index) ? delta.index : this.toolCalls.length;
      let call = this.toolCalls[index];
      if (!call) {
        call = { id: "", type: "function", function: { name: "", arguments: "" } };
        this.toolCalls[index] = call;
      }
      if (delta.id) call.id = delta.id;
      if (delta.function) {
        if (delta.function.name) call.function.name += delta.function.name;
        if (delta.function.arguments) call.function.arguments += delta.function.arguments;
      }
      this.schedule();
    }

    setSources(sources) {
      if (Array.isArray(sources) && sources.length > 0) {
        this.sources = sources;
        this.schedule();
      }
    }

    setToolResults(results) {
      if (Array.isArray(results) && results.length > 0) {
        this.toolResults = results;
        this.schedule();
      }
    }

    schedule() {
      if (this.scheduled) return;
      this.scheduled = true;
      requestAnimationFrame(() => {
        this.scheduled = false;
        this.render();
      });
    }

    render() {
      renderContent(this.content, this.text);
      for (const old of this.msg.querySelectorAll(".extra")) old.remove();
      const calls = this.toolCalls.filter(Boolean);
      if (calls.length > 0) {
        const box = el("details", "extra tool-calls");
        box.open = true;
        box.append(el("summary", "", `tool calls (${calls.length})`));
        for (const call of calls) {
          const item = el("div", "tool-call");
          item.append(el("strong", "", call.function.name || "(unnamed)"));
          let args = call.function.arguments;
          try {
            args = JSON.stringify(JSON.parse(args), null, 2);
          } catch {
            // still streaming or not JSON: show as is
          }
          item.append(el("pre", "", args));
          box.append(item);
        }
        this.msg.append(box);
      }
      if (this.toolResults) {
        // Tools the node executed itself: what the model asked and what came back.
        const box = el("details", "extra tool-calls");
        box.append(el("summary", "", `tools run by the node (${this.toolResults.length})`));
        for (const r of this.toolResults) {
          if (!r || typeof r !== "object") continue;
          const item = el("div", "tool-call");
          item.append(el("strong", "", `${r.name || "(unnamed)"}${r.ok === false ? " (failed)" : ""}`));
          item.append(el("pre", "", typeof r.arguments === "string" ? r.arguments : JSON.stringify(r.arguments, null, 2)));
          if (typeof r.result === "string") item.append(el("pre", "", r.result.length > 1000 ? r.result.slice(0, 1000) + "…" : r.result));
          box.append(item);
        }
        this.msg.append(box);
      }
      if (this.sources) {
        const box = el("details", "extra sources");
        box.append(el("summary", "", `sources (${this.sources.length})`));
        for (const source of this.sources) box.append(renderSource(source));
        this.msg.append(box);
      }
      const meta = [];
      if (this.servedBy) meta.push("served by " + shortNode(this.servedBy));
      if (this.finishReason && this.finishReason !== "stop") meta.push("finish: " + this.finishReason);
      if (this.usage) {
        meta.push(`${this.usage.prompt_tokens} prompt + ${this.usage.completion_tokens} completion tokens`);
      }
      if (meta.length > 0) this.msg.append(el("div", "extra meta", meta.join(" · ")));
      els.messages.scrollTop = els.messages.scrollHeight;
    }

    finish(state, error) {
      this.render();
      if (error) this.msg.append(el("div", "extra error", error));
      this.msg.dataset.state = state;
    }
  }

  function renderSource(source) {
    const box = el("div", "source");
    if (typeof source === "string") {
      box.append(el("pre", "", source));
      return box;
    }
    if (!source || typeof source !== "object") return box;
    // Gaia's sources: {source, title, heading, score, text}; other fields shown if present.
    const title = source.title || source.source || source.file || source.path || source.url || source.id || "source";
    const head = el("div");
    head.append(el("strong", "", String(title)));
    const where = [source.title && source.source && source.source !== source.title ? source.source : "", source.heading || ""]
      .filter(Boolean)
      .join(" › ");
    if (where) head.append(el("span", "score", where));
    if (typeof source.score === "number") head.append(el("span", "score", "score " + source.score.toFixed(3)));
    box.append(head);
    const snippet = source.text || source.content || source.chunk || source.snippet;
    if (typeof snippet === "string") box.append(el("pre", "", snippet.length > 600 ? snippet.slice(0, 600) + "…" : snippet));
    return box;
  }

  /** Handles one parsed SSE `data:` payload; returns true at `[DONE]`. */
  function handleEvent(reply, data) {
    if (data === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw new Error("the node sent a malformed stream event: " + data.slice(0, 200));
    }
    if (chunk.error) {
      throw new Error(typeof chunk.error === "string" ? chunk.error : chunk.error.message || "stream error");
    }
    if (chunk.sources) reply.setSources(chunk.sources);
    if (chunk.tool_results) reply.setToolResults(chunk.tool_results);
    if (chunk.usage) reply.usage = chunk.usage;
    const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
    if (choice) {
      const delta = choice.delta || {};
      if (typeof delta.content === "string" && delta.content) reply.appendText(delta.content);
      if (Array.isArray(delta.tool_calls)) for (const d of delta.tool_calls) reply.addToolCallDelta(d);
      if (choice.finish_reason) reply.finishReason = choice.finish_reason;
      if (choice.sources) reply.setSources(choice.sources);
    }
    return false;
  }

  /** Reads a text/event-stream body, calling `onData` with each event's data; stops at [DONE]. */
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data !== "" && onData(data)) {
          reader.cancel().catch(() => {});
          return true;
        }
      }
      if (buffer.length > MAX_EVENT_BYTES) throw new Error("the node sent an oversized stream event");
    }
    return false;
  }

  /** A node id or peer id shortened for a table cell (the whole id is the title). */
  function shortNode(id) {
    const text = String(id);
    return text.length > 18 ? text.slice(0, 10) + "…" + text.slice(-6) : text;
  }

  function cell(text, title) {
    const td = el("td", "", text === undefined || text === null ? "–" : String(text));
    if (title) td.title = title;
    return td;
  }

  /** GET `path` of this node's API as JSON; throws an Error with the node's message. */
  async function getJson(path) {
    const response = await fetch(path, { headers: headers() });
    if (!response.ok) {
      const error = new Error(await errorMessage(response));
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  /** Which node served each answer of this page, newest first. */
  const servedLog = [];
  /** This node's address, once /v1/info has been read. */
  let ownAddress = "";
  function recordServed(question, node) {
    servedLog.unshift({ at: new Date(), question, node });
    if (servedLog.length > 50) servedLog.pop();
    renderServed();
  }
  function renderServed() {
    if (servedLog.length === 0) {
      els.served.replaceChildren(el("li", "muted", "no answers yet on this page"));
      return;
    }
    els.served.replaceChildren(
      ...servedLog.map((entry) => {
        const item = el("li");
        const own = ownAddress && entry.node.toLowerCase() === ownAddress.toLowerCase();
        item.append(el("strong", "", shortNode(entry.node) + (own ? " (this node)" : "")));
        item.title = entry.node;
        const question = entry.question.length > 80 ? entry.question.slice(0, 80) + "…" : entry.question;
        item.append(el("span", "muted", ` ${entry.at.toLocaleTimeString()} · ${question}`));
        return item;
      }),
    );
  }

  function price(p) {
    if (!p || typeof p !== "object") return "–";
    if (!p.prompt && !p.completion) return "free";
    return `${p.prompt} · ${p.completion}`;
  }

  /** How long ago a unix-milliseconds time was. */
  function ago(unixMs) {
    if (typeof unixMs !== "number") return "–";
    const ms = Math.max(0, Date.now() - unixMs);
    return ms < 1000 ? "just now" : `${Math.round(ms / 1000)} s ago`;
  }

  async function loadDomain() {
    els.domainSummary.textContent = "loading…";
    renderServed();
    let info;
    try {
      info = await getJson("/v1/info");
    } catch (e) {
      els.domainSummary.textContent = "cannot read the node's state: " + e.message;
      els.domainSummary.classList.add("error");
      return;
    }
    els.domainSummary.classList.remove("error");
    ownAddress = typeof info.address === "string" ? info.address : "";
    renderServed();
    const swarm = info.swarm;
    const load = info.load || {};
    const own = `This node: ${load.in_flight ?? 0} in flight, ${load.queued ?? 0} queued.`;
    if (!swarm) {
      els.domainSummary.textContent = `${own} It is in no domain: it answers alone. Start it with --domain to share the load with the nodes of a domain.`;
      els.members.hidden = true;
      return;
    }
    if (swarm.error) {
      els.domainSummary.textContent = `${own} The swarm does not answer: ${swarm.error}`;
      els.members.hidden = true;
      return;
    }
    const members = Array.isArray(swarm.members) ? swarm.members : [];
    els.domainSummary.textContent = `${own} Domain topic ${swarm.topic}; ${members.length} other member${members.length === 1 ? "" : "s"}, ${swarm.connected} peer connection${swarm.connected === 1 ? "" : "s"}; reachability ${swarm.nat || "unknown"}.`;
    els.membersBody.replaceChildren(
      ...members.map((m) => {
        const row = el("tr");
        row.dataset.node = m.node;
        row.append(
          cell(shortNode(m.node), m.node + (m.peer_id ? "\npeer " + m.peer_id : "")),
          cell(m.model, m.model_sha256),
          cell(m.routable ? "routable" : `unroutable${m.unroutable ? ": " + m.unroutable : ""}`),
          cell(m.in_flight),
          cell(m.queued),
          cell(price(m.price)),
          cell(ago(m.last_heard_ms)),
        );
        return row;
      }),
    );
    els.members.hidden = members.length === 0;
  }

  function bytes(n) {
    if (typeof n !== "number") return "–";
    if (n < 1024) return `${n} B`;
    if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / (1 << 20)).toFixed(1)} MiB`;
  }

  async function loadKb() {
    els.kbSummary.textContent = "loading…";
    let list;
    try {
      list = await getJson("/v1/kb/documents");
    } catch (e) {
      els.kbSummary.textContent = e.status === 404 ? "This node has no knowledge base." : "cannot list the documents: " + e.message;
      els.kbSummary.classList.toggle("error", e.status !== 404);
      els.documents.hidden = true;
      els.kbUpload.hidden = e.status === 404;
      return;
    }
    els.kbSummary.classList.remove("error");
    els.kbUpload.hidden = false;
    const docs = Array.isArray(list.data) ? list.data : [];
    els.kbSummary.textContent = `${list.documents} document${list.documents === 1 ? "" : "s"}, ${list.chunks} chunk${list.chunks === 1 ? "" : "s"}; hash ${String(list.hash || "").slice(0, 16)}…`;
    els.documentsBody.replaceChildren(
      ...docs.map((d) => {
        const row = el("tr");
        row.dataset.source = d.source;
        const remove = el("button", "link", "Remove");
        remove.type = "button";
        remove.addEventListener("click", () => removeDocument(d.source));
        const action = el("td");
        action.append(remove);
        row.append(cell(d.source), cell(d.title), cell(d.content_type), cell(d.chunks), cell(bytes(d.text_bytes)), action);
        return row;
      }),
    );
    els.documents.hidden = docs.length === 0;
  }

  /** The Content-Type of an upload: the browser's, else from the file's extension. */
  function uploadType(file) {
    if (file.type) return file.type;
    const ext = (file.name.split(".").pop() || "").toLowerCase();
    return { md: "text/markdown", markdown: "text/markdown", html: "text/html", htm: "text/html", pdf: "application/pdf" }[ext] || "text/plain";
  }

  async function uploadDocument() {
    const file = els.kbFile.files && els.kbFile.files[0];
    if (!file) {
      setStatus("choose a file first", true);
      return;
    }
    setStatus(`adding ${file.name}…`);
    try {
      const response = await fetch("/v1/kb/documents?source=" + encodeURIComponent(file.name), {
        method: "POST",
        headers: { ...headers(), "Content-Type": uploadType(file) },
        body: await file.arrayBuffer(),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const stored = await response.json();
      const doc = stored.document || {};
      setStatus(`added ${doc.source}: ${doc.chunks} chunk${doc.chunks === 1 ? "" : "s"}`);
      els.kbFile.value = "";
    } catch (e) {
      setStatus(`cannot add ${file.name}: ${e.message}`, true);
    }
    loadKb();
  }

  async function removeDocument(source) {
    setStatus(`removing ${source}…`);
    try {
      const response = await fetch("/v1/kb/documents?source=" + encodeURIComponent(source), {
        method: "DELETE",
        headers: headers(),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      setStatus(`removed ${source}`);
    } catch (e) {
      setStatus(`cannot remove ${source}: ${e.message}`, true);
    }
    loadKb();
  }

  function fact(term, value) {
    els.nodeFacts.append(el("dt", "", term), el("dd", "", value === undefined || value === null || value === "" ? "–" : String(value)));
  }

  async function loadNodeFacts() {
    els.nodeFacts.replaceChildren(el("dd", "", "loading…"));
    let info;
    try {
      info = await getJson("/v1/info");
    } catch (e) {
      els.nodeFacts.replaceChildren(el("dd", "error", "cannot read the node's state: " + e.message));
      return;
    }
    els.nodeFacts.replaceChildren();
    fact("Version", `${info.version}`);
    fact("Address", info.address);
    fact("API", info.listen);
    fact("Data directory", info.data_dir);
    const models = info.models || {};
    if (models.chat) fact("Chat model", `${models.chat.name} (context ${models.chat.context} tokens; sha256 ${String(models.chat.sha256).slice(0, 12)}…)`);
    if (models.embedding) fact("Embedding model", `${models.embedding.name} (${models.embedding.dimensions} dimensions)`);
    if (info.gateway) fact("Role", "gateway: no local model, requests go to the domain");
    const kb = info.knowledge_base;
    fact("Knowledge base", kb ? `${kb.documents} documents, ${kb.chunks} chunks` : "none");
    fact("Domain", info.swarm ? info.swarm.topic : "none");
    const payments = info.payments;
    fact("Payments", payments ? (payments.enabled === false ? "off" : "on") : "off");
    const mcp = Array.isArray(info.mcp) ? info.mcp : [];
    fact("MCP servers", mcp.length === 0 ? "none" : mcp.map((m) => `${m.name}: ${m.state}`).join(", "));
    fact("Up for", `${info.uptime_secs} s`);
  }

  /** Shows the view named by the URL's hash (the chat by default). */
  function showView() {
    const wanted = location.hash.replace(/^#/, "");
    const view = VIEWS.includes(wanted) ? wanted : "chat";
    for (const name of VIEWS) {
      $("view-" + name).hidden = name !== view;
      const tab = $("tab-" + name);
      if (name === view) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    document.body.dataset.view = view;
    if (view === "domain") loadDomain();
    else if (view === "knowledge") loadKb();
    else if (view === "settings") loadNodeFacts();
    else els.prompt.focus();
  }

  function numberField(input) {
    const text = input.value.trim();
    if (text === "") return undefined;
    const n = Number(text);
    return Number.isFinite(n) ? n : undefined;
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.send.hidden = busy;
    els.stop.hidden = !busy;
    els.prompt.disabled = false;
  }

  async function send(text) {
    if (inFlight) return;
    const model = els.model.value;
    if (!model) {
      setStatus("no model selected (is the node serving one?)", true);
      return;
    }
    storageSet(MODEL_STORAGE, model);
    addMessage("user", text);
    history.push({ role: "user", content: text });

    const messages = [];
    const system = els.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const request = { model, messages, stream: true, stream_options: { include_usage: true } };
    const maxTokens = numberField(els.maxTokens);
    if (maxTokens !== undefined) request.max_tokens = Math.floor(maxTokens);
    const temperature = numberField(els.temperature);
    if (temperature !== undefined) request.temperature = temperature;

    const reply = new Reply();
    const controller = new AbortController();
    inFlight = controller;
    setBusy(true);
    setStatus("generating…");
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      reply.servedBy = response.headers.get("x-gaia-node") || "this node";
      recordServed(text, reply.servedBy);
      const type = response.headers.get("content-type") || "";
      if (type.includes("text/event-stream") && response.body) {
        const complete = await readEvents(response.body, (data) => handleEvent(reply, data));
        if (!complete) throw new Error("the stream ended before [DONE]");
      } else {
        // A node may answer without streaming; take the whole completion.
        const body = await response.json();
        const choice = body.choices && body.choices[0];
        const message = (choice && choice.message) || {};
        if (message.content) reply.appendText(message.content);
        for (const [i, call] of (message.tool_calls || []).entries()) reply.addToolCallDelta({ index: i, ...call });
        reply.setSources(body.sources);
        reply.setToolResults(body.tool_results);
        reply.usage = body.usage || null;
        reply.finishReason = choice ? choice.finish_reason : null;
      }
      const assistant = { role: "assistant", content: reply.text };
      const calls = reply.toolCalls.filter(Boolean);
      if (calls.length > 0) assistant.tool_calls = calls;
      history.push(assistant);
      reply.finish("done");
      setStatus("");
    } catch (e) {
      if (e.name === "AbortError") {
        // Keep what arrived; the node stops generating when the connection closes.
        history.push({ role: "assistant", content: reply.text });
        reply.finish("stopped", "(stopped)");
        setStatus("stopped");
      } else {
        history.pop();
        reply.finish("error", e.message);
        setStatus(e.message, true);
      }
    } finally {
      inFlight = null;
      setBusy(false);
      els.prompt.focus();
    }
  }

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || inFlight) return;
    els.prompt.value = "";
    send(text);
  });
  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => {
    if (inFlight) inFlight.abort();
  });
  els.clear.addEventListener("click", () => {
    if (inFlight) inFlight.abort();
    history = [];
    els.messages.replaceChildren();
    setStatus("");
  });
  els.apiKey.value = storageGet(KEY_STORAGE);
  els.apiKey.addEventListener("change", () => {
    storageSet(KEY_STORAGE, els.apiKey.value.trim());
    loadModels();
  });
  els.model.addEventListener("change", () => storageSet(MODEL_STORAGE, els.model.value));

  els.kbUpload.addEventListener("submit", (event) => {
    event.preventDefault();
    uploadDocument();
  });
  $("kb-refresh").addEventListener("click", loadKb);
  $("domain-refresh").addEventListener("click", loadDomain);
  window.addEventListener("hashchange", showView);

  setBusy(false);
  loadModels();
  showView();
})();
