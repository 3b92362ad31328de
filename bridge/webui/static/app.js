// mtor web UI. Plain JavaScript, no build step, nothing fetched from
// elsewhere. Everything that came from a model or a peer is put into the
// page as text (textContent, text nodes) or as a data: URL of a checked
// media type — never parsed as HTML.
"use strict";

(() => {
  const STORE_KEY = "mtor.conversation.v1";
  const MAX_STORED = 200;          // messages kept in localStorage
  const MAX_STORED_MEDIA = 300000; // base64 chars of media kept per message
  const HISTORY_TURNS = 12;        // earlier turns sent with a chat question
  const CHUNK_SIZE = 1024 * 1024;  // vision upload pieces, as the seed client
  const SWARM_POLL_MS = 2000;
  const MAX_ANSWERS = 30;

  const $ = (id) => document.getElementById(id);
  const el = {
    conn: $("conn"), newChat: $("new-chat"), messages: $("messages"), empty: $("empty"),
    notice: $("notice"), form: $("composer"), qtype: $("qtype"), model: $("model"), prefer: $("prefer"),
    imageLabel: $("image-label"), image: $("image"), record: $("record"), attachment: $("attachment"),
    prompt: $("prompt"), send: $("send"), stop: $("stop"),
    summary: $("swarm-summary"), peers: document.querySelector("#peers tbody"), answers: $("answers"),
    ledger: $("ledger"), ledgerTotal: $("ledger-total"), ledgerPeers: $("ledger-peers"),
  };

  // Small DOM helper: h("div", {className: "x"}, "text", child). Strings
  // become text nodes.
  function h(tag, props, ...children) {
    const n = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === "dataset") Object.assign(n.dataset, v);
        else n[k] = v;
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      n.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return n;
  }

  const shortPeer = (id) => (typeof id === "string" && id.length > 10 ? "…" + id.slice(-8) : String(id || "?"));
  const fmtSecs = (ms) => (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
  const okMime = (m) => typeof m === "string" && /^(image|audio)\/[a-z0-9.+-]{1,60}$/i.test(m);
  const okB64 = (s) => typeof s === "string" && /^[A-Za-z0-9+/]*={0,2}$/.test(s);

  // ---- conversation (kept in this browser only) ----------------------------

  let conversation = [];
  function loadConversation() {
    try {
      const v = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
      conversation = Array.isArray(v) ? v.filter((m) => m && typeof m === "object") : [];
    } catch (_) {
      conversation = [];
    }
  }
  function saveConversation() {
    const keep = conversation.slice(-MAX_STORED).map((m) => {
      const c = Object.assign({}, m);
      if (c.media && c.media.data && c.media.data.length > MAX_STORED_MEDIA) c.media = { dropped: true, mime: c.media.mime };
      delete c.live;
      delete c.question;
      return c;
    });
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(keep));
    } catch (_) {
      // Quota: keep the text, drop the media.
      try {
        localStorage.setItem(STORE_KEY, JSON.stringify(keep.map((m) => Object.assign({}, m, { media: undefined }))));
      } catch (_) { /* give up quietly: the page still works */ }
    }
  }

  // ---- rendering of messages ----------------------------------------------

  function typeLabel(t) {
    return { chat: "", vision: "vision", imagine: "imagine", speech: "speech", tts: "text to speech", stt: "speech to text" }[t] || "";
  }

  function renderMedia(bubble, media) {
    if (!media) return;
    if (media.dropped) {
      bubble.append(h("div", { className: "sub-line" }, "(" + (media.mime || "media") + " not kept in this browser)"));
      return;
    }
    if (!okMime(media.mime) || !okB64(media.data)) return;
    const src = "data:" + media.mime + ";base64," + media.data;
    if (media.mime.startsWith("image/")) {
      bubble.append(h("img", { src, alt: "image from the swarm" }));
    } else {
      bubble.append(h("audio", { src, controls: true, preload: "metadata" }));
    }
  }

  function metaText(m) {
    const d = m.done;
    if (!d) return null;
    const parts = [];
    if (d.model) parts.push(d.model);
    parts.push(fmtSecs(d.total_ms || (d.processing_time || 0) * 1000));
    // 0 ms is a real figure on a LAN (or this node's own worker).
    if (typeof d.ttft_ms === "number") parts.push("first token " + (d.ttft_ms < 10 ? "< 0.01 s" : fmtSecs(d.ttft_ms)));
    if (d.tokens_per_sec) parts.push(d.tokens_per_sec.toFixed(1) + " tok/s");
    if (d.energy_mj) parts.push((d.energy_mj / 1000).toFixed(2) + " J");
    return parts.join(" · ");
  }

  // renderMessage builds (or rebuilds) the node of one message.
  function renderMessage(m) {
    const node = h("div", { className: "msg " + (m.role === "user" ? "user" : "assistant") });
    node.dataset.state = m.state || "done";
    if (m.id) node.dataset.queryId = m.id;
    const tag = typeLabel(m.qtype);
    if (tag && m.role === "user") node.append(h("span", { className: "tag" }, tag));
    const bubble = h("div", { className: "bubble" });
    bubble.append(document.createTextNode(m.text || ""));
    if (m.transcript) bubble.append(h("div", { className: "sub-line" }, "heard: " + m.transcript));
    renderMedia(bubble, m.media);
    node.append(bubble);
    const meta = metaText(m);
    if (meta || (m.done && m.done.peer)) {
      const line = h("div", { className: "meta" });
      if (m.done && m.done.peer) line.append("answered by ", h("span", { className: "peer", title: m.done.peer }, shortPeer(m.done.peer)), meta ? " · " : "");
      if (meta) line.append(meta);
      node.append(line);
    }
    m.live = { node, bubble, text: bubble.firstChild };
    return node;
  }

  function appendMessage(m) {
    conversation.push(m);
    el.empty.hidden = true;
    el.messages.append(renderMessage(m));
    scrollDown();
    return m;
  }

  function rerender(m) {
    if (!m.live) return;
    const old = m.live.node;
    old.replaceWith(renderMessage(m));
    scrollDown();
  }

  function scrollDown() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function renderConversation() {
    el.messages.replaceChildren(el.empty);
    el.empty.hidden = conversation.length > 0;
    for (const m of conversation) {
      if (m.state === "streaming" || m.state === "waiting") {
        m.state = "error";
        m.text = (m.text || "") + (m.text ? "\n" : "") + "(interrupted: the page was reloaded)";
      }
      el.messages.append(renderMessage(m));
    }
    scrollDown();
  }

  let noticeTimer = 0;
  function notice(text) {
    el.notice.textContent = text;
    el.notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { el.notice.hidden = true; }, 8000);
  }

  // ---- models -----------------------------------------------------------------

  // models: name -> Set of API type names (chat, vision, imagine, stt, tts, embed)
  let models = new Map();
  // Models known only from the swarm's catalogue: this node (without the
  // swarm view) has not routed to them yet, so it holds none of their workers.
  let catalogOnly = new Set();
  const seedToApi = { speech: "stt" };

  function setModels(list) {
    const next = new Map();
    const nextCatalog = new Set();
    for (const m of list) {
      if (!m || typeof m.name !== "string") continue;
      const types = next.get(m.name) || new Set();
      for (const t of m.types || []) types.add(seedToApi[t] || t);
      next.set(m.name, types);
      if (m.catalog === true) nextCatalog.add(m.name);
    }
    const same = next.size === models.size && [...next].every(([k, v]) => models.has(k) && models.get(k).size === v.size) &&
      nextCatalog.size === catalogOnly.size && [...nextCatalog].every((k) => catalogOnly.has(k));
    models = next;
    catalogOnly = nextCatalog;
    if (!same) fillModelPicker();
  }

  function modelOption(n) {
    if (!catalogOnly.has(n)) return h("option", { value: n }, n);
    return h("option", { value: n, title: "known from the swarm's model catalogue; this node finds its workers at the first query", dataset: { catalog: "true" } },
      n + " · catalogue");
  }

  // The type a model must serve for the selected query type.
  function neededType(q) {
    return { chat: "chat", vision: "vision", imagine: "imagine", speech: "chat", tts: "tts" }[q] || "chat";
  }

  function fillModelPicker() {
    const want = neededType(el.qtype.value);
    const current = el.model.value;
    const names = [...models].filter(([, ts]) => ts.has(want)).map(([n]) => n).sort();
    el.model.replaceChildren(...names.map(modelOption));
    if (names.length === 0) el.model.append(h("option", { value: "", disabled: true, selected: true }, "no model serves " + want));
    if (names.includes(current)) el.model.value = current;
    updateSendable();
  }

  // ---- WebSocket --------------------------------------------------------------

  let socket = null;
  let retry = 500;
  let everOpen = false;
  let failures = 0;
  const running = new Map(); // query_id -> assistant message

  // A bridge with API keys wants one on /ws too. Open the page as
  // /#key=YOUR_KEY: the fragment never leaves the browser; the key is kept
  // for this tab only.
  const KEY_STORE = "mtor.key";
  (() => {
    const m = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (m) {
      try { sessionStorage.setItem(KEY_STORE, decodeURIComponent(m[1])); } catch (_) { /* private mode */ }
      window.history.replaceState(null, "", location.pathname + location.search);
    }
  })();
  function apiKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    // format=text: answers come as plain text (this page never parses them
    // as HTML); the seed's own client gets them HTML-escaped instead.
    let url = proto + "//" + location.host + "/ws?format=text";
    if (apiKey()) url += "&key=" + encodeURIComponent(apiKey());
    socket = new WebSocket(url);
    el.conn.dataset.state = "connecting";
    el.conn.textContent = "connecting…";
    socket.onopen = () => {
      retry = 500;
      everOpen = true;
      failures = 0;
      el.conn.dataset.state = "open";
      el.conn.textContent = "connected";
      updateSendable();
    };
    socket.onclose = () => {
      el.conn.dataset.state = "closed";
      el.conn.textContent = "disconnected — retrying";
      for (const [id, m] of running) finishWithError(id, m, "connection lost");
      if (!everOpen && ++failures === 3) {
        notice("Cannot open the connection to the bridge. If it requires an API key, open this page as /#key=YOUR_KEY.");
      }
      updateSendable();
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 15000);
    };
    socket.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      if (msg && typeof msg.type === "string") handle(msg);
    };
  }

  function send(obj) {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      notice("Not connected to the bridge; try again in a moment.");
      return false;
    }
    socket.send(JSON.stringify(obj));
    return true;
  }

  function handle(msg) {
    const m = typeof msg.query_id === "string" ? running.get(msg.query_id) : undefined;
    switch (msg.type) {
      case "set_cookie":
        if (msg.name === "user_guid" && /^[0-9a-f-]{36}$/i.test(msg.value || "")) {
          document.cookie = "user_guid=" + msg.value + "; path=/; max-age=31536000; SameSite=Strict";
        }
        break;
      case "worker_update":
        setModels((msg.workers || []).map((w) => ({ name: w.model || w.name, types: [w.type] })).concat(apiModels));
        break;
      case "query_started":
        if (m) {
          m.model = msg.model;
          if (m.state !== "streaming") { m.state = "waiting"; m.text = "asking " + (msg.model || "the swarm") + "…"; rerender(m); }
        }
        break;
      case "queue_update":
        if (m && m.state === "waiting" && msg.depth > 0) { m.text = "queued (" + msg.depth + " ahead)…"; rerender(m); }
        break;
      case "query_transcript":
        if (m && m.question) { m.question.transcript = msg.text; rerender(m.question); }
        break;
      case "query_restart":
        // The answering peer died mid-answer: what streamed so far is void,
        // the whole answer comes again from another peer.
        if (m) { m.state = "waiting"; m.text = "the answering peer was lost; restarting on another peer…"; rerender(m); }
        break;
      case "query_chunk":
        if (m && typeof msg.text === "string") {
          if (m.state !== "streaming") {
            m.state = "streaming";
            m.text = "";
            rerender(m);
          }
          m.text += msg.text;
          m.live.text.appendData(msg.text);
          scrollDown();
        }
        break;
      case "query_result":
        if (m) {
          if ((msg.result_type === "image" || msg.result_type === "audio") && okMime(msg.mime)) {
            m.media = { mime: msg.mime, data: msg.result };
            if (m.state === "waiting") m.text = "";
          } else if (m.state !== "streaming") {
            m.text = String(msg.result || "");
          }
          rerender(m);
        }
        break;
      case "query_done":
        if (m) {
          running.delete(msg.query_id);
          m.state = "done";
          m.done = {
            peer: msg.peer, model: msg.model, total_ms: msg.total_ms, ttft_ms: msg.ttft_ms,
            tokens_per_sec: msg.tokens_per_sec, energy_mj: msg.energy_mj, processing_time: msg.processing_time,
          };
          rerender(m);
          addAnswer(m, msg);
          saveConversation();
          updateSendable();
        }
        break;
      case "error":
        if (m) finishWithError(msg.query_id, m, msg.code === "CANCELLED" ? "stopped" : msg.message);
        else notice(String(msg.message || "error"));
        break;
      case "vision_upload_complete":
        if (m && m.state === "waiting") { m.text = "image uploaded, asking…"; rerender(m); }
        break;
    }
  }

  function finishWithError(id, m, text) {
    running.delete(id);
    const partial = m.state === "streaming" ? m.text : "";
    m.state = text === "stopped" ? "done" : "error";
    m.text = partial ? partial + "\n[" + text + "]" : "[" + text + "]";
    rerender(m);
    saveConversation();
    updateSendable();
  }

  // ---- asking -----------------------------------------------------------------

  let seq = 0;
  const newID = () => "ui-" + Date.now().toString(36) + "-" + (++seq) + "-" + Math.random().toString(36).slice(2, 8);

  let pendingImage = null; // {b64, name}
  let recorder = null;
  let recorded = null; // base64 webm

  // The earlier chat turns, sent along so the model sees the conversation.
  function chatHistory() {
    return conversation
      .filter((m) => m.state === "done" && m.text && !m.media && (m.qtype === "chat" || m.qtype === "speech"))
      .slice(-HISTORY_TURNS)
      .map((m) => ({ role: m.role === "user" ? "user" : "assistant", content: m.role === "user" && m.transcript ? m.transcript : m.text }));
  }

  function submit() {
    const qtype = el.qtype.value;
    const model = el.model.value;
    const prompt = el.prompt.value.trim();
    if (qtype === "vision" && !pendingImage) { notice("Choose an image for a vision question."); return; }
    if (qtype === "speech" && !recorded) { notice("Record your question first."); return; }
    if (qtype !== "speech" && !prompt) return;
    const id = newID();
    const prefer = el.prefer.value; // "" = the node's own --prefer-energy
    const hist = qtype === "chat" || qtype === "vision" || qtype === "speech" ? chatHistory() : [];
    const question = appendMessage({ role: "user", qtype, text: qtype === "speech" ? "(voice question)" : prompt, state: "done" });
    if (qtype === "vision" && pendingImage) question.text += "\n[image: " + pendingImage.name + "]";
    rerender(question);
    const answer = appendMessage({ role: "assistant", qtype, id, text: "sending…", state: "waiting" });
    answer.question = question;
    running.set(id, answer);

    let ok;
    if (qtype === "vision") {
      const img = pendingImage.b64;
      const total = Math.max(1, Math.ceil(img.length / CHUNK_SIZE));
      ok = true;
      for (let i = 0; i < total && ok; i++) {
        ok = send({
          type: "vision_chunk", query_id: id, chunk_id: i, total_chunks: total,
          chunk_data: img.slice(i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE), image_id: id,
          prompt, query_type: "vision", model_type: "worker_node", model_name: model, history: hist,
          ...(prefer ? { prefer } : {}),
        });
      }
    } else {
      const query = { prompt, query_type: qtype, model_type: "worker_node", model_name: model, history: hist };
      if (prefer) query.prefer = prefer;
      if (qtype === "speech") query.audio = recorded;
      ok = send({ type: "submit_query", query_id: id, query });
    }
    if (!ok) { finishWithError(id, answer, "not sent: no connection"); return; }
    el.prompt.value = "";
    clearAttachment();
    saveConversation();
    updateSendable();
  }

  function clearAttachment() {
    pendingImage = null;
    recorded = null;
    el.image.value = "";
    el.attachment.hidden = true;
    el.attachment.textContent = "";
  }

  function readAsBase64(blob) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(String(r.result).split(",")[1] || "");
      r.onerror = () => reject(r.error);
      r.readAsDataURL(blob);
    });
  }

  async function toggleRecording() {
    if (recorder) { recorder.stop(); return; }
    if (!navigator.mediaDevices || typeof MediaRecorder === "undefined") { notice("This browser cannot record audio."); return; }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const parts = [];
      recorder = new MediaRecorder(stream);
      recorder.ondataavailable = (e) => parts.push(e.data);
      recorder.onstop = async () => {
        stream.getTracks().forEach((t) => t.stop());
        recorder = null;
        el.record.classList.remove("recording");
        el.record.textContent = "● Record";
        recorded = await readAsBase64(new Blob(parts, { type: "audio/webm" }));
        el.attachment.textContent = "voice recorded";
        el.attachment.hidden = false;
        updateSendable();
      };
      recorder.start();
      el.record.classList.add("recording");
      el.record.textContent = "■ Stop recording";
    } catch (e) {
      notice("Could not use the microphone: " + (e && e.message ? e.message : e));
    }
  }

  function updateSendable() {
    const open = socket && socket.readyState === WebSocket.OPEN;
    el.send.disabled = !open || !el.model.value;
    el.stop.hidden = running.size === 0;
  }

  function onTypeChange() {
    const q = el.qtype.value;
    el.imageLabel.hidden = q !== "vision";
    el.record.hidden = q !== "speech";
    el.prompt.disabled = q === "speech";
    el.prompt.placeholder = {
      vision: "Ask about the image…",
      imagine: "Describe the picture to draw…",
      speech: "Record a voice question, then Send",
      tts: "Text to speak…",
    }[q] || "Message the swarm…  (Enter to send, Shift+Enter for a new line)";
    clearAttachment();
    fillModelPicker();
  }

  // ---- swarm view -------------------------------------------------------------

  let apiModels = [];

  function gpuCell(p) {
    const gpus = Array.isArray(p.gpus) ? p.gpus : [];
    if (gpus.length === 0) return h("td", { className: "sub-line" }, "no GPU");
    const td = h("td");
    for (const g of gpus) {
      const used = g.vram_total_bytes ? (g.vram_total_bytes - g.vram_free_bytes) / 2 ** 30 : 0;
      td.append(h("div", null, String(g.name || "GPU")));
      const bits = [];
      if (g.vram_total_bytes) bits.push(used.toFixed(1) + "/" + (g.vram_total_bytes / 2 ** 30).toFixed(0) + " GiB");
      bits.push((g.util_percent || 0) + "%");
      if (g.power_mw) bits.push((g.power_mw / 1000).toFixed(0) + " W");
      td.append(h("div", { className: "sub-line" }, bits.join(" · ")));
    }
    return td;
  }

  function healthCell(p) {
    const score = Math.round(Math.min(Number(p.health) || 0, p.local_health ? Number(p.local_health) : 100));
    const bar = h("div", { className: "bar" + (score < 50 ? " low" : score < 80 ? " mid" : "") }, h("span"));
    bar.firstChild.style.width = Math.max(0, Math.min(100, score)) + "%";
    const td = h("td", null, h("div", { className: "health" }, bar, String(score)));
    const notes = [];
    if (p.breaker && p.breaker !== "closed") notes.push("breaker " + p.breaker);
    if (p.draining) notes.push("draining");
    // Honesty spot checks: how far its answers match the model it announces.
    if (p.distrusted) notes.push("distrusted: answers disagree with its model");
    else if (!p.self && p.reputation !== undefined && Number(p.reputation) < 100) notes.push("reputation " + Math.round(Number(p.reputation)));
    if (p.rtt_ms) notes.push(Number(p.rtt_ms).toFixed(0) + " ms rtt");
    if (notes.length) td.append(h("div", { className: "sub-line" }, notes.join(" · ")));
    return td;
  }

  // How others reach the peer (from the addresses it announces) and how
  // this bridge is connected to it now.
  function reachCell(p) {
    const via = Array.isArray(p.relayed_via) ? p.relayed_via : [];
    const reach = {
      public: "public",
      relayed: "behind NAT, relayed via " + via.map(shortPeer).join(", "),
      private: "LAN only",
    }[p.reachability] || "unknown";
    let path;
    if (p.self) path = "this node";
    else if (p.unreachable) path = "unreachable";
    else if (p.path === "direct") {
      path = p.hole_punched ? "direct after hole punch" : "direct";
      // the transport of the direct connection: which one a hole punch chose
      if (Array.isArray(p.path_transports) && p.path_transports.length) path += " (" + p.path_transports.join(", ") + ")";
    }
    else if (p.path === "relayed") path = "relayed via " + shortPeer(p.path_relay);
    else path = "not connected";
    const td = h("td", { className: "reach" }, h("div", null, reach));
    td.dataset.reachability = String(p.reachability || "");
    td.dataset.path = String(p.path || "");
    td.append(h("div", { className: "sub-line" }, path));
    return td;
  }

  function renderSwarm(data) {
    const peers = Array.isArray(data.peers) ? data.peers : [];
    apiModels = Array.isArray(data.models) ? data.models : [];
    setModels(apiModels);
    const rows = peers.map((p) => {
      const idCell = h("td", null, h("span", { className: "peer-id", title: String(p.peer) }, shortPeer(p.peer)));
      if (p.self) idCell.append(h("span", { className: "badge" }, "this node"));
      if (p.version) idCell.append(h("div", { className: "sub-line" }, (/^\d/.test(p.version) ? "v" : "") + p.version));
      const modelsCell = h("td");
      for (const m of p.models || []) {
        const line = h("span", { className: "model" }, String(m.name), " ", h("span", { className: "types" }, (m.types || []).join(", ")));
        if (m.tokens_per_sec) line.append(h("span", { className: "types" }, " · " + Number(m.tokens_per_sec).toFixed(0) + " tok/s"));
        if (m.joules_per_token) line.append(h("span", { className: "types" }, " · " + Number(m.joules_per_token).toPrecision(3) + " J/token"));
        modelsCell.append(line);
      }
      const load = h("td", null, (p.in_flight || 0) + " / " + (p.max_concurrency || "?"));
      if (p.queued) load.append(h("div", { className: "sub-line" }, p.queued + " queued"));
      return h("tr", { dataset: { peer: String(p.peer) } }, idCell, modelsCell, gpuCell(p), load, healthCell(p), reachCell(p));
    });
    if (rows.length === 0) rows.push(h("tr", null, h("td", { colSpan: 6, className: "sub-line" }, "no workers seen yet: start one with mtor node --backend … --join TOKEN")));
    el.peers.replaceChildren(...rows);
    const gpuCount = peers.reduce((n, p) => n + (Array.isArray(p.gpus) ? p.gpus.length : 0), 0);
    // Say "GPU" only of a swarm that has one; tell the visitor of an
    // empty swarm how to add a worker.
    $("route-target").textContent = gpuCount > 0 ? "GPU" : "worker";
    $("add-worker").hidden = peers.some((p) => (p.models || []).length > 0);
    el.summary.textContent = peers.length + (peers.length === 1 ? " worker" : " workers") + " · " +
      apiModels.length + (apiModels.length === 1 ? " model" : " models") + " · " + gpuCount + " GPU" + (gpuCount === 1 ? "" : "s");
  }

  // The node's ledger: work consumed from and served to each peer, from
  // checked receipts (docs/operations.md, "Accounting").
  function work(t) {
    if (!t || !t.queries) return "–";
    const parts = [t.queries + " q", ((t.prompt_tokens || 0) + (t.completion_tokens || 0)) + " tok", fmtSecs(t.ms || 0)];
    if (t.energy_mj) parts.push((t.energy_mj / 1000).toFixed(1) + " J");
    return parts.join(" · ");
  }

  function renderLedger(l) {
    if (!l || !l.total) { el.ledger.hidden = true; return; }
    el.ledger.hidden = false;
    el.ledgerTotal.textContent = "This node consumed " + work(l.total.consumed) + "; served " + work(l.total.served) + ".";
    const rows = (Array.isArray(l.peers) ? l.peers : []).map((p) => h("tr", { dataset: { peer: String(p.peer) } },
      h("td", null, h("span", { className: "peer-id", title: String(p.peer) }, shortPeer(p.peer))),
      h("td", null, work(p.consumed)), h("td", null, work(p.served))));
    if (rows.length === 0) rows.push(h("tr", null, h("td", { colSpan: 3, className: "sub-line" }, "no receipts yet")));
    el.ledgerPeers.replaceChildren(...rows);
  }

  async function pollSwarm() {
    try {
      // With a key, a bridge that has keys adds this node's ledger.
      const headers = { Accept: "application/json" };
      if (apiKey()) headers.Authorization = "Bearer " + apiKey();
      const r = await fetch("/api/swarm", { cache: "no-store", headers });
      if (r.ok) { const data = await r.json(); renderSwarm(data); renderLedger(data.ledger); }
      else el.summary.textContent = "swarm view unavailable (" + r.status + ")";
    } catch (_) {
      el.summary.textContent = "swarm view unavailable";
    } finally {
      setTimeout(pollSwarm, SWARM_POLL_MS);
    }
  }

  function addAnswer(m, done) {
    const q = m.question && (m.question.transcript || m.question.text) || "";
    const stats = [fmtSecs(done.total_ms || done.processing_time * 1000)];
    if (done.tokens_per_sec) stats.push(Number(done.tokens_per_sec).toFixed(1) + " tok/s");
    if (done.energy_mj) stats.push((done.energy_mj / 1000).toFixed(2) + " J");
    // A countersigned receipt came with the answer (docs/protocol.md §6.4).
    if (done.receipt) stats.push("signed");
    const li = h("li", null,
      h("span", { className: "q", title: q }, q),
      h("span", { className: "who", title: String(done.peer || "") }, shortPeer(done.peer)),
      " ", h("span", { className: "stats" }, String(done.model || "") + " · " + stats.join(" · ")));
    const placeholder = el.answers.querySelector(".empty-answers");
    if (placeholder) placeholder.remove();
    el.answers.prepend(li);
    while (el.answers.children.length > MAX_ANSWERS) el.answers.lastChild.remove();
  }

  // ---- wiring ----------------------------------------------------------------

  el.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); if (!el.send.disabled) submit(); }
  });
  el.stop.addEventListener("click", () => { for (const id of running.keys()) send({ type: "cancel", query_id: id }); });
  el.qtype.addEventListener("change", onTypeChange);
  el.model.addEventListener("change", updateSendable);
  el.record.addEventListener("click", toggleRecording);
  el.image.addEventListener("change", async () => {
    const f = el.image.files && el.image.files[0];
    if (!f) { clearAttachment(); return; }
    if (!f.type.startsWith("image/")) { notice("That file is not an image."); clearAttachment(); return; }
    pendingImage = { b64: await readAsBase64(f), name: f.name };
    el.attachment.textContent = f.name;
    el.attachment.hidden = false;
  });
  el.newChat.addEventListener("click", () => {
    for (const id of running.keys()) send({ type: "cancel", query_id: id });
    conversation = [];
    saveConversation();
    renderConversation();
  });

  el.answers.append(h("li", { className: "empty-answers" }, "Answers will show which peer served them."));
  loadConversation();
  renderConversation();
  onTypeChange();
  connect();
  pollSwarm();
})();
