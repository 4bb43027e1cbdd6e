// notify-bridge demo page: connect to the bridge's WebSocket as a user, watch
// notifications arrive, join channels, send a notification over the HTTP API.
//
// Plain browser JavaScript, no framework, no build step; the bridge embeds
// this file in its binary. Everything received from the network is put into
// the page as text (textContent), never parsed as HTML.
//
// Settings come from <script id="settings" type="application/json">, written
// by the bridge: {ws_host, ws_port, ws_path, auth_mode, dev_tokens}.
// ws_host null means "the host this page was loaded from".
//
// Page URL parameters: ?token=T (auth_mode "jwt") or ?user_id=U (auth_mode
// "none") connect at once; ?channel=C (repeatable) joins C after connecting.

(function () {
  "use strict";

  const settings = JSON.parse(document.getElementById("settings").textContent);
  const $ = (id) => document.getElementById(id);

  const BACKOFF_START_MS = 500; // first retry after about half a second
  const BACKOFF_MAX_MS = 10000; // never wait longer than 10 s between tries
  const MAX_ITEMS = 200; // notifications and log lines kept on screen

  const CLOSE_CODES = {
    1000: "normal closure",
    1001: "going away (server shutting down)",
    1003: "unsupported data (binary frame)",
    1005: "no status code",
    1006: "abnormal closure: no close frame (handshake refused, or connection lost)",
    1008: "policy violation (token expired, or closed by an admin)",
    1009: "message too big",
    1011: "internal server error",
    1013: "try again later (this client read too slowly)",
  };

  // --- connection state ---------------------------------------------------

  let credentials = null; // {token} or {userId}: who to connect as
  let socket = null; // the current WebSocket, if any
  let wanted = false; // true while we should stay connected (and reconnect)
  let attempt = 0; // reconnect attempts since the last welcome
  let reconnectTimer = null;
  let countdownTimer = null;
  const joined = new Set(); // channels the server says we are in
  const wantedChannels = new Set(); // channels to join again after a reconnect
  let notificationCount = 0;
  let targetEdited = false; // the send form's target was typed by hand
  // Inbox: the highest seq seen per user, kept across reloads, so that a
  // reconnect (or a reload) asks for `since` it and misses nothing.
  let inboxUser = null; // whose seq we track (from the welcome frame)
  let lastSeq = null; // null: nothing known yet (first visit: since=0)

  /** Shows the state in the top bar; `state` styles the dot. */
  function setState(state, text) {
    document.body.dataset.state = state;
    $("state-text").textContent = text;
  }

  /**
   * The WebSocket URL for `creds`, on the bridge's own WebSocket port: with
   * a token, the one-time `ticket` got for it (no token in the URL).
   */
  function socketUrl(creds, ticket) {
    let host = settings.ws_host || location.hostname;
    if (host.includes(":") && !host.startsWith("[")) host = `[${host}]`; // IPv6
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = new URLSearchParams();
    if (creds.token) query.set("ticket", ticket);
    else query.set("user_id", creds.userId);
    if (settings.inbox) query.set("since", String(sinceFor(creds)));
    return `${scheme}://${host}:${settings.ws_port}${settings.ws_path}?${query}`;
  }

  /** The user `creds` will connect as, as far as the page can tell. */
  function credentialUser(creds) {
    if (creds.userId) return String(creds.userId);
    const claims = tokenClaims(creds.token);
    return claims && claims.sub !== undefined ? String(claims.sub) : null;
  }

  function seqKey(user) {
    return `notify-bridge.demo.since.${user}`;
  }

  /** `since` for a connection: the last seq seen by this page (0 at first). */
  function sinceFor(creds) {
    const user = credentialUser(creds);
    if (user !== inboxUser) {
      inboxUser = user;
      const stored = user === null ? null : Number(localStorage.getItem(seqKey(user)));
      lastSeq = Number.isSafeInteger(stored) && stored > 0 ? stored : null;
    }
    return lastSeq === null ? 0 : lastSeq;
  }

  /** Remembers a seq that arrived, here and for the next reload. */
  function sawSeq(seq) {
    if (typeof seq !== "number" || (lastSeq !== null && seq <= lastSeq)) return;
    lastSeq = seq;
    if (inboxUser !== null) localStorage.setItem(seqKey(inboxUser), String(seq));
  }

  /** The same URL with the ticket hidden, for display. */
  function redact(url) {
    return url.replace(/ticket=[^&]*/, "ticket=…");
  }

  /**
   * A one-time ticket for `token` (POST api/ws-ticket, the token in a
   * header). Rejects with `status` set when the bridge answered an error.
   */
  async function fetchTicket(token) {
    const response = await fetch("api/ws-ticket", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    });
    const body = await response.json().catch(() => ({}));
    if (response.status !== 201) {
      const failure = new Error(body.detail || `HTTP ${response.status}`);
      failure.status = response.status;
      throw failure;
    }
    return body.ticket;
  }

  /** Connects as `creds`, replacing any current connection. */
  function connect(creds) {
    stop("switching to a new connection");
    credentials = creds;
    wanted = true;
    attempt = 0;
    open();
  }

  /** Closes the socket (if any), logging `note`, and cancels reconnects. */
  function stop(note) {
    wanted = false;
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    if (socket) {
      const old = socket;
      socket = null; // its close event is ignored from now on
      old.close(1000, "bye");
      log(note);
    }
    clearWelcome();
    $("disconnect").disabled = true;
  }

  /**
   * Gets a ticket when connecting with a token, then opens the socket. A
   * token the bridge refuses stops here; an unreachable bridge is retried.
   */
  function open() {
    clearInterval(countdownTimer);
    $("disconnect").disabled = false;
    setState("connecting", attempt ? `reconnecting (attempt ${attempt + 1})…` : "connecting…");
    const creds = credentials;
    const ticket = creds.token ? fetchTicket(creds.token) : Promise.resolve(null);
    ticket.then(
      (ticket) => {
        if (creds === credentials && wanted) openSocket(socketUrl(creds, ticket));
      },
      (failure) => {
        if (creds !== credentials || !wanted) return;
        log(`could not get a ticket: ${failure.message}`, "bad");
        if (failure.status === 401) {
          wanted = false;
          $("disconnect").disabled = true;
          setState("stopped", `the bridge refused the token (${failure.message}). Not reconnecting.`);
          return;
        }
        scheduleReconnect();
      },
    );
  }

  /** Opens one WebSocket; its close event decides about reconnecting. */
  function openSocket(url) {
    $("ws-url").textContent = redact(url);
    const ws = new WebSocket(url);
    socket = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (event) => {
      if (ws === socket) handleFrame(event.data);
    };
    ws.onclose = (event) => {
      if (ws !== socket) return; // replaced or stopped on purpose
      socket = null;
      handleClose(event, opened);
    };
  }

  /** After a close: show code and reason, then reconnect unless told not to. */
  function handleClose(event, opened) {
    const meaning = CLOSE_CODES[event.code] || "";
    const reason = event.reason ? ` — reason: ${event.reason}` : "";
    const text = `${event.code}${meaning ? ` (${meaning})` : ""}${reason}`;
    $("last-close").textContent = `${text}, at ${clock(new Date())}`;
    log(`closed: ${text}`, event.code === 1000 ? "" : "warn");
    clearWelcome();

    if (!wanted) {
      setState("idle", "disconnected");
      return;
    }
    if (event.code === 1008) {
      // Policy: the token expired or an admin closed us. Retrying would only
      // repeat it; the user has to connect again (with a new token).
      wanted = false;
      $("disconnect").disabled = true;
      setState("stopped", `closed by policy (1008): ${event.reason || "no reason given"}. Not reconnecting.`);
      return;
    }
    const claims = credentials.token ? tokenClaims(credentials.token) : null;
    if (claims && typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) {
      wanted = false;
      $("disconnect").disabled = true;
      setState("stopped", "the token has expired: get a new one. Not reconnecting.");
      return;
    }
    if (!opened) {
      log("the handshake failed: the bridge refused it (bad token?) or cannot be reached", "bad");
    }
    scheduleReconnect();
  }

  /** Exponential backoff with jitter: 0.5 s, 1 s, 2 s, … capped at 10 s. */
  function scheduleReconnect() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** attempt);
    const delay = Math.min(BACKOFF_MAX_MS, Math.round(base * (0.75 + Math.random() * 0.5)));
    attempt += 1;
    const due = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setState("reconnecting", `connection lost; reconnecting in ${left} s (attempt ${attempt})`);
    };
    tick();
    countdownTimer = setInterval(tick, 1000);
    reconnectTimer = setTimeout(open, delay);
    log(`reconnecting in ${(delay / 1000).toFixed(1)} s`);
  }

  /** Sends a client frame if the socket is open; false otherwise. */
  function sendFrame(frame) {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      log(`not connected: ${frame.type} not sent`, "warn");
      return false;
    }
    socket.send(JSON.stringify(frame));
    return true;
  }

  // --- frames from the server ----------------------------------------------

  function handleFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (e) {
      log(`not JSON: ${text}`, "bad");
      return;
    }
    switch (frame.type) {
      case "welcome":
        attempt = 0; // the backoff starts over after a good connection
        $("connection-id").textContent = frame.connection_id;
        $("welcome-user").textContent = String(frame.user_id);
        joined.clear();
        (frame.channels || []).forEach((c) => joined.add(c));
        renderChannels();
        setState("open", `connected as user ${frame.user_id}`);
        log(`welcome: connection ${frame.connection_id}, user ${frame.user_id}` +
          (joined.size ? `, channels ${[...joined].join(", ")}` : ""));
        if (!targetEdited && $("target-kind").value === "user_id") {
          $("target").value = String(frame.user_id);
        }
        // Join again what we had joined before a reconnect.
        wantedChannels.forEach((c) => {
          if (!joined.has(c)) sendFrame({ type: "subscribe", channel: c });
        });
        break;
      case "notification":
        addNotification(frame, text);
        if (frame.seq !== undefined) {
          sawSeq(frame.seq);
          // A new stored entry sends no counts frame; replayed ones are
          // already in the last one. Ask the inbox API for the exact count.
          refreshUnread();
        }
        break;
      case "subscribed":
        joined.add(frame.channel);
        wantedChannels.add(frame.channel);
        renderChannels();
        log(`subscribed: ${frame.channel}`);
        break;
      case "unsubscribed":
        joined.delete(frame.channel);
        wantedChannels.delete(frame.channel);
        renderChannels();
        log(`unsubscribed: ${frame.channel}`);
        break;
      case "error":
        log(`error ${frame.code}: ${frame.detail}`, "bad");
        break;
      case "pong":
        log("pong");
        break;
      case "inbox":
        setUnread(frame.unread);
        log(`inbox: ${frame.total} stored, ${frame.unread} unread`);
        break;
      case "gap":
        log(`gap: entries after ${frame.since} were dropped; oldest kept is ${frame.oldest}`, "warn");
        break;
      default:
        log(`frame: ${text}`);
    }
  }

  /** Adds one notification at the top of the list, as text only. */
  function addNotification(frame, rawFrame) {
    const item = document.createElement("li");
    item.className = "notification";
    item.dataset.notificationId = String(frame.id); // data-notification-id="ID"

    const meta = document.createElement("div");
    meta.className = "meta";
    meta.append(
      span("event", frame.event || "notification"),
      span("id", String(frame.id)),
    );
    if (frame.seq !== undefined) meta.append(span("tag", `seq ${frame.seq}`));
    if (frame.channel !== undefined) meta.append(span("tag", `channel ${frame.channel}`));
    if (frame.broadcast) meta.append(span("tag", "broadcast"));
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = clock(now);
    meta.append(time);

    const payload = document.createElement("pre");
    payload.className = "payload";
    payload.textContent = prettyPayload(rawFrame, frame.payload);

    // The whole frame as received, folded away.
    const raw = document.createElement("details");
    raw.className = "raw";
    const summary = document.createElement("summary");
    summary.textContent = "frame";
    const rawText = document.createElement("pre");
    rawText.textContent = rawFrame;
    raw.append(summary, rawText);

    item.append(meta, payload, raw);
    if (frame.seq !== undefined) {
      // Stored in the inbox: clicking it marks it read (every tab updates).
      item.classList.add("unread");
      item.title = "click to mark read";
      item.addEventListener("click", (event) => {
        if (event.target.closest("details") || !item.classList.contains("unread")) return;
        if (sendFrame({ type: "read", ids: [String(frame.id)] })) {
          item.classList.remove("unread");
          item.title = "";
        }
      });
    }
    const list = $("notifications");
    list.prepend(item);
    while (list.children.length > MAX_ITEMS) list.lastElementChild.remove();
    notificationCount += 1;
    $("count").textContent = String(notificationCount);
    $("empty").hidden = true;
  }

  /** Shows the inbox's unread count. */
  function setUnread(n) {
    const badge = $("unread");
    badge.textContent = `${n} unread`;
    badge.hidden = !settings.inbox;
  }

  let unreadTimer = null;

  /** Reads the exact counts from GET /api/me/notifications, at most every 300 ms. */
  function refreshUnread() {
    if (unreadTimer || !credentials) return;
    unreadTimer = setTimeout(async () => {
      unreadTimer = null;
      const query = credentials.token ? "limit=1" : `limit=1&user_id=${encodeURIComponent(credentials.userId)}`;
      const headers = credentials.token ? { Authorization: `Bearer ${credentials.token}` } : {};
      try {
        const response = await fetch(`/api/me/notifications?${query}`, { headers });
        if (response.ok) setUnread((await response.json()).unread);
      } catch (e) {
        // The next counts frame or notification corrects it.
      }
    }, 300);
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  /**
   * The payload, indented, from the frame's own text: the bridge forwards the
   * publisher's JSON as it was (big integers, number formats, escapes), and
   * JSON.parse + JSON.stringify would round big integers. Falls back to
   * JSON.stringify if the frame cannot be scanned.
   */
  function prettyPayload(rawFrame, parsed) {
    try {
      const raw = rawMember(rawFrame, "payload");
      if (raw !== null) return indentJson(raw);
    } catch (e) {
      // fall through
    }
    return JSON.stringify(parsed, null, 2);
  }

  /** The source text of member `key` of the JSON object `text`, or null. */
  function rawMember(text, key) {
    let i = 0;
    const space = () => {
      while (i < text.length && " \t\r\n".includes(text[i])) i++;
    };
    const skipString = () => {
      i++; // opening quote
      while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
      i++; // closing quote
    };
    const skipValue = () => {
      if (text[i] === '"') return skipString();
      let depth = 0;
      while (i < text.length) {
        const c = text[i];
        if (c === '"') {
          skipString();
          continue;
        }
        if (c === "{" || c === "[") depth++;
        else if (c === "}" || c === "]") {
          if (depth === 0) return; // end of the enclosing object
          depth--;
        } else if (c === "," && depth === 0) return;
        i++;
      }
    };
    space();
    if (text[i] !== "{") return null;
    i++;
    for (;;) {
      space();
      if (text[i] !== '"') return null;
      const keyStart = i;
      skipString();
      const name = JSON.parse(text.slice(keyStart, i));
      space();
      if (text[i] !== ":") return null;
      i++;
      space();
      const valueStart = i;
      skipValue();
      if (name === key) return text.slice(valueStart, i).trim();
      space();
      if (text[i] !== ",") return null;
      i++;
    }
  }

  /**
   * A JSON string token as a person reads it: escapes such as `\u2713`
   * (Python's json.dumps writes every non-ASCII character so) decoded, and
   * only what JSON needs escaped again (quotes, backslashes, control
   * characters), so the text stays valid JSON. Numbers never pass through
   * here, so big integers stay exactly as received.
   */
  function readableString(token) {
    try {
      return JSON.stringify(JSON.parse(token));
    } catch (e) {
      return token;
    }
  }

  /**
   * Re-indents JSON text token by token, changing nothing but whitespace and
   * the escapes inside strings (see readableString).
   */
  function indentJson(raw) {
    let out = "";
    let depth = 0;
    const newline = () => "\n" + "  ".repeat(depth);
    for (let i = 0; i < raw.length; i++) {
      const c = raw[i];
      if (c === '"') {
        const start = i;
        i++;
        while (i < raw.length && raw[i] !== '"') i += raw[i] === "\\" ? 2 : 1;
        out += readableString(raw.slice(start, i + 1));
      } else if (c === "{" || c === "[") {
        let j = i + 1;
        while (" \t\r\n".includes(raw[j])) j++;
        if (raw[j] === (c === "{" ? "}" : "]")) {
          out += c + raw[j]; // {} and [] stay on one line
          i = j;
        } else {
          depth++;
          out += c + newline();
        }
      } else if (c === "}" || c === "]") {
        depth--;
        out += newline() + c;
      } else if (c === ",") {
        out += "," + newline();
      } else if (c === ":") {
        out += ": ";
      } else if (!" \t\r\n".includes(c)) {
        out += c;
      }
    }
    return out;
  }

  // --- small helpers ---------------------------------------------------------

  /** Local wall-clock time, HH:MM:SS. */
  function clock(date) {
    return date.toLocaleTimeString([], { hour12: false });
  }

  /** Adds a line at the top of the connection log. */
  function log(text, level) {
    const item = document.createElement("li");
    if (level) item.className = level;
    const time = document.createElement("time");
    time.textContent = clock(new Date());
    const body = document.createElement("span");
    body.textContent = text;
    item.append(time, body);
    const list = $("log");
    list.prepend(item);
    while (list.children.length > MAX_ITEMS) list.lastElementChild.remove();
  }

  function renderChannels() {
    $("channels").textContent = joined.size ? [...joined].join(", ") : "none";
  }

  function clearWelcome() {
    $("connection-id").textContent = "–";
    $("welcome-user").textContent = "–";
    joined.clear();
    renderChannels();
  }

  /** The claims of a JWT, decoded for display only (not verified), or null. */
  function tokenClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
      return JSON.parse(atob(padded));
    } catch (e) {
      return null;
    }
  }

  /** Describes the pasted token under its field. */
  function showTokenInfo() {
    const token = $("token").value.trim();
    const info = $("token-info");
    if (!token) {
      info.textContent = "";
      return;
    }
    const claims = tokenClaims(token);
    if (!claims) {
      info.textContent = "This does not look like a JWT.";
      return;
    }
    const parts = [];
    if (claims.sub !== undefined) parts.push(`user (sub) ${claims.sub}`);
    if (Array.isArray(claims.channels)) parts.push(`channels ${claims.channels.join(", ") || "none"}`);
    if (typeof claims.exp === "number") {
      const exp = new Date(claims.exp * 1000);
      const minutes = Math.round((exp - Date.now()) / 60000);
      parts.push(minutes < 0 ? `EXPIRED at ${clock(exp)}` : `expires ${clock(exp)} (in ${minutes} min)`);
    }
    info.textContent = parts.join(" · ");
  }

  // --- the send form: POST /api/notifications/send ---------------------------

  async function sendNotification(event) {
    event.preventDefault();
    const result = $("send-result");
    const show = (text, ok, status) => {
      result.hidden = false;
      result.className = `result ${ok ? "ok" : "bad"}`;
      result.dataset.status = String(status);
      result.textContent = text;
    };

    const payloadText = $("payload").value.trim();
    try {
      JSON.parse(payloadText);
    } catch (e) {
      show(`The payload is not valid JSON: ${e.message}`, false, 0);
      return;
    }
    // The body is built around the payload's own text, so that what you
    // typed (big integers included) is what is sent.
    const kind = $("target-kind").value;
    const target = $("target").value.trim();
    const members = [];
    if (kind === "user_ids") {
      const ids = target.split(",").map((s) => s.trim()).filter(Boolean);
      members.push(`"user_ids":${JSON.stringify(ids)}`);
    } else if (kind === "broadcast") {
      members.push(`"broadcast":true`);
    } else {
      members.push(`${JSON.stringify(kind)}:${JSON.stringify(target)}`);
    }
    const eventName = $("event").value.trim();
    if (eventName) members.push(`"event":${JSON.stringify(eventName)}`);
    const body = `{${members.join(",")},"payload":${payloadText}}`;

    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;

    $("send").disabled = true;
    try {
      const response = await fetch("api/notifications/send", { method: "POST", headers, body });
      const text = await response.text();
      let pretty = text;
      try {
        pretty = JSON.stringify(JSON.parse(text), null, 2);
      } catch (e) {
        // not JSON: show it as it is
      }
      show(`HTTP ${response.status} ${response.statusText}\n${pretty}`, response.ok, response.status);
    } catch (e) {
      show(`The request failed: ${e.message}`, false, 0);
    } finally {
      $("send").disabled = false;
    }
  }

  // --- wiring -------------------------------------------------------------------

  function connectFromForm(event) {
    event.preventDefault();
    if (settings.auth_mode === "none") {
      const userId = $("user-id").value.trim();
      if (!userId) return log("give a user id", "warn");
      connect({ userId });
    } else {
      const token = $("token").value.trim();
      if (!token) return log("paste a token first" + (settings.dev_tokens ? ", or get one" : ""), "warn");
      connect({ token });
    }
  }

  async function getToken() {
    const user = $("token-user").value.trim();
    if (!user) return log("give a user id to get a token for", "warn");
    const query = new URLSearchParams({ user_id: user });
    try {
      const response = await fetch(`api/dev/token?${query}`);
      const body = await response.json();
      if (!response.ok) throw new Error(`${response.status} ${body.error}: ${body.detail}`);
      $("token").value = body.token;
      showTokenInfo();
      log(`got a development token for user ${body.user_id}`);
      connect({ token: body.token });
    } catch (e) {
      log(`could not get a token: ${e.message}`, "bad");
    }
  }

  function changeChannel(type) {
    const channel = $("channel").value.trim();
    if (!channel) return log("give a channel name", "warn");
    if (type === "subscribe") wantedChannels.add(channel);
    else wantedChannels.delete(channel);
    if (sendFrame({ type, channel })) log(`${type} ${channel} sent`);
  }

  function init() {
    document.body.classList.add(settings.auth_mode === "none" ? "mode-none" : "mode-jwt");
    if (settings.dev_tokens) document.body.classList.add("dev-tokens");
    if (settings.inbox) document.body.classList.add("inbox");

    $("connect-form").addEventListener("submit", connectFromForm);
    $("disconnect").addEventListener("click", () => {
      stop("disconnected by you");
      setState("idle", "disconnected");
    });
    $("get-token").addEventListener("click", getToken);
    $("token").addEventListener("input", showTokenInfo);
    $("channel-form").addEventListener("submit", (e) => {
      e.preventDefault();
      changeChannel("subscribe");
    });
    $("unsubscribe").addEventListener("click", () => changeChannel("unsubscribe"));
    $("ping").addEventListener("click", () => sendFrame({ type: "ping" }));
    $("send-form").addEventListener("submit", sendNotification);
    $("target").addEventListener("input", () => {
      targetEdited = true;
    });
    $("target-kind").addEventListener("change", () => {
      $("target").disabled = $("target-kind").value === "broadcast";
    });
    $("clear").addEventListener("click", () => {
      $("notifications").replaceChildren();
      notificationCount = 0;
      $("count").textContent = "0";
      $("empty").hidden = false;
    });
    $("clear-log").addEventListener("click", () => $("log").replaceChildren());
    // Back online: do not wait for the backoff timer.
    window.addEventListener("online", () => {
      if (wanted && !socket) {
        clearTimeout(reconnectTimer);
        open();
      }
    });

    // ?token=T / ?user_id=U connect at once; ?channel=C joins C.
    const params = new URLSearchParams(location.search);
    params.getAll("channel").filter(Boolean).forEach((c) => wantedChannels.add(c));
    const token = params.get("token");
    const userId = params.get("user_id");
    if (settings.auth_mode === "none" && userId) {
      $("user-id").value = userId;
      connect({ userId });
    } else if (settings.auth_mode !== "none" && token) {
      // The token leaves the address bar (and so the history) at once; the
      // page keeps it in memory to get a ticket for each connection.
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
      $("token").value = token;
      showTokenInfo();
      connect({ token });
    } else {
      setState("idle", "not connected");
    }
  }

  init();
})();
