// Usage: node examples/client.js --url ws://127.0.0.1:8080/ws --token "$TOKEN" [--channel C]... [--count N]   (Node >= 22; Node 20: node --experimental-websocket ...)
//
// A notify-bridge WebSocket client for browsers and Node, in one plain file:
// connect with a token in `?token=`, reconnect with exponential backoff (with
// jitter, capped at 10 s) after a drop, stop after a 1008 close (token
// expired, or closed by an admin: reconnecting would not help), and hand
// every frame to your callbacks.
//
// In a browser: <script src="client.js"></script>, then
//
//   const client = connectNotifications({
//     url: "ws://127.0.0.1:8080/ws",
//     token: "…",                          // a JWT for the user
//     channels: ["public:news"],           // optional: joined after each welcome
//     onNotification: (n) => console.log(n.event, n.id, n.payload),
//     onState: (state, detail) => console.log(state, detail),
//   });
//   client.subscribe("public:other");      // later; client.close() to stop
//
// In Node: require("./client.js").connectNotifications(…), or run this file
// as shown on the first line; it prints one JSON line per notification.

(function (root) {
  "use strict";

  /**
   * Connects and stays connected until close() or a 1008.
   *
   * options: url (ws:// or wss://, without ?token), token, channels (array),
   * onNotification(frame), onFrame(frame) for every frame, onState(state,
   * detail) with state one of "connecting", "open", "reconnecting", "stopped"
   * (1008: will not reconnect), "closed" (you called close()), and
   * maxBackoffMs (default 10000). WebSocket: a constructor, for Node < 22.
   */
  function connectNotifications(options) {
    const WS = options.WebSocket || globalThis.WebSocket;
    if (!WS) throw new Error("no WebSocket here: use Node >= 22 (or --experimental-websocket on Node 20)");
    const maxBackoff = options.maxBackoffMs || 10000;
    const channels = new Set(options.channels || []);
    const onState = options.onState || (() => {});
    let socket = null;
    let attempt = 0; // failed tries since the last welcome
    let timer = null;
    let stopped = false;

    function url() {
      const sep = options.url.includes("?") ? "&" : "?";
      return `${options.url}${sep}token=${encodeURIComponent(options.token)}`;
    }

    function open() {
      onState("connecting", { attempt });
      const ws = new WS(url());
      socket = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
      };
      // A connection that never opened: browsers follow with a close event,
      // Node 20's WebSocket does not, so this handles it once either way.
      ws.onerror = () => {
        if (!opened) ended(ws, 1006, "connection failed");
      };
      ws.onmessage = (event) => {
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (e) {
          return; // the bridge only sends JSON; ignore anything else
        }
        if (frame.type === "welcome") {
          attempt = 0;
          onState("open", frame);
          // Join (again) the channels we want; already joined ones are fine.
          for (const channel of channels) {
            if (!(frame.channels || []).includes(channel)) send({ type: "subscribe", channel });
          }
        }
        if (options.onFrame) options.onFrame(frame);
        if (frame.type === "notification" && options.onNotification) options.onNotification(frame);
      };
      ws.onclose = (event) => ended(ws, event.code, event.reason);
    }

    /** The socket `ws` is gone: stop, or reconnect after a backoff delay. */
    function ended(ws, code, reason) {
      if (ws !== socket) return; // already handled, or replaced
      socket = null;
      if (stopped) return onState("closed", { code, reason });
      if (code === 1008) {
        stopped = true;
        return onState("stopped", { code, reason });
      }
      // Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to maxBackoff.
      const base = Math.min(maxBackoff, 500 * 2 ** attempt);
      const delay = Math.min(maxBackoff, Math.round(base * (0.75 + Math.random() * 0.5)));
      attempt += 1;
      onState("reconnecting", { code, reason, delay, attempt });
      timer = setTimeout(open, delay);
    }

    function send(frame) {
      if (socket && socket.readyState === 1 /* OPEN */) socket.send(JSON.stringify(frame));
    }

    open();
    return {
      /** Joins `channel` now (if connected) and after every reconnect. */
      subscribe(channel) {
        channels.add(channel);
        send({ type: "subscribe", channel });
      },
      unsubscribe(channel) {
        channels.delete(channel);
        send({ type: "unsubscribe", channel });
      },
      /** Sends any client frame, e.g. {type: "ping"}. */
      send,
      /** Closes for good (no reconnect). */
      close() {
        stopped = true;
        clearTimeout(timer);
        if (socket) socket.close(1000, "bye");
        else onState("closed", {});
      },
    };
  }

  // Node: export it, and run as a command-line listener when started directly.
  // A browser gets one global, connectNotifications.
  if (typeof module !== "undefined" && module.exports) {
    module.exports = { connectNotifications };
    if (typeof require !== "undefined" && require.main === module) main();
  } else {
    root.connectNotifications = connectNotifications;
  }

  function main() {
    const args = { url: "ws://127.0.0.1:8080/ws", token: process.env.NOTIFY_BRIDGE_TOKEN, channels: [], count: 0 };
    const argv = process.argv.slice(2);
    for (let i = 0; i < argv.length; i += 1) {
      const value = argv[i + 1];
      switch (argv[i]) {
        case "--url": args.url = value; i += 1; break;
        case "--token": args.token = value; i += 1; break;
        case "--channel": args.channels.push(value); i += 1; break;
        case "--count": args.count = Number(value); i += 1; break;
        default:
          console.error(`unknown argument ${argv[i]}\nusage: node client.js --url WS_URL --token TOKEN [--channel C]... [--count N]`);
          process.exit(2);
      }
    }
    if (!args.token) {
      console.error("give --token (or NOTIFY_BRIDGE_TOKEN); e.g. notify-bridge --config config/dev.toml token --user 1");
      process.exit(2);
    }
    let received = 0;
    const client = connectNotifications({
      url: args.url,
      token: args.token,
      channels: args.channels,
      onState: (state, detail) => {
        const info = state === "open" ? `connection ${detail.connection_id}, user ${detail.user_id}` : JSON.stringify(detail);
        console.error(`client.js: ${state} ${info}`);
        if (state === "stopped") process.exit(1);
        if (state === "closed") process.exit(0);
      },
      onNotification: (frame) => {
        console.log(JSON.stringify(frame));
        received += 1;
        if (args.count && received >= args.count) client.close();
      },
    });
    process.on("SIGINT", () => client.close());
  }
})(typeof globalThis !== "undefined" ? globalThis : this);
