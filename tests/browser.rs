//! The demo page in a real headless Chromium, driven over the Chrome
//! DevTools Protocol: connect as a user, receive from AMQP, render payloads
//! as text, send through the page's form, reconnect after a bridge restart,
//! stop after a 1008, look tidy at desktop and phone width (screenshots in
//! target/demo-screenshot.png and target/demo-screenshot-mobile.png).
//!
//! Needs Debian's `chromium` (scripts/test installs it). Without it these
//! tests fail under CI=true and are skipped with a notice otherwise. Set
//! CHROMIUM=/path/to/chrome to use another build.

mod common;

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use base64::Engine as _;
use common::{
    inbox::{wait_for_stored, with_inbox, ScratchStore},
    *,
};
use futures_util::{SinkExt, StreamExt};
use notify_bridge::config::AuthMode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const API_KEY: &str = "browser-api-key";
const ADMIN_KEY: &str = "browser-admin-key";
/// How long the page may take for anything it should do on its own.
const PAGE_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Chromium and the DevTools Protocol
// ---------------------------------------------------------------------------

/// The Chromium binary, or None (after printing why) when the test should
/// be skipped. Panics when it is missing under CI.
fn chromium_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("CHROMIUM")
        .map(|p| vec![PathBuf::from(p)])
        .unwrap_or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from)
                .collect()
        });
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Some(found.clone());
    }
    let message = format!(
        "Chromium not found at {candidates:?} (install it: apt-get install -y chromium, \
         as scripts/test does; or set CHROMIUM=/path/to/chromium)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED browser test: {message}");
    None
}

/// A headless Chromium with a fresh profile. Dropping it kills its whole
/// process group and removes the profile.
struct Browser {
    child: Child,
    /// Removed when dropped (after Drop::drop has killed the browser).
    profile: tempfile::TempDir,
    devtools: SocketAddr,
}

impl Browser {
    fn launch(binary: &Path) -> Self {
        let profile = tempfile::Builder::new()
            .prefix("notify-bridge-chromium")
            .tempdir()
            .unwrap();
        let log = std::fs::File::create(profile.path().join("chromium.log")).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(binary)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-quic",
                    "--remote-debugging-port=0",
                    "--window-size=1280,900",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                // Its own process group, so that Drop reaches every helper
                // process (renderers, zygote) too.
                .process_group(0)
                .spawn()
                .expect("start chromium")
        };
        let mut browser = Self {
            child,
            profile,
            devtools: "127.0.0.1:0".parse().unwrap(),
        };
        browser.devtools = browser.wait_for_devtools_port();
        browser
    }

    /// Chromium writes its DevTools port to `DevToolsActivePort` in the profile.
    fn wait_for_devtools_port(&mut self) -> SocketAddr {
        let file = self.profile.path().join("DevToolsActivePort");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(port) = text
                    .lines()
                    .next()
                    .and_then(|l| l.trim().parse::<u16>().ok())
                {
                    return SocketAddr::from(([127, 0, 0, 1], port));
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromium exited ({status}) before DevTools was up:\n{}",
                    self.log()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {} within 30 s:\n{}",
                file.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.profile.path().join("chromium.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Attaches to the page Chromium opened at start.
    async fn page(&self) -> Cdp {
        let body = devtools_get(self.devtools, "/json/list").await;
        let targets: Vec<Value> = serde_json::from_str(&body).unwrap();
        let url = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {body}"))
            .to_string();
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("DevTools connection in time")
            .expect("DevTools handshake");
        let mut cdp = Cdp {
            ws,
            next_id: 0,
            events: Vec::new(),
        };
        cdp.call("Page.enable", json!({})).await;
        cdp.call("Runtime.enable", json!({})).await;
        cdp
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // `kill -KILL -- -PGID`: the browser and every helper it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools Protocol session with one page.
struct Cdp {
    ws: Client,
    next_id: u64,
    /// Every event received so far (method and params).
    events: Vec<Value>,
}

impl Cdp {
    /// Sends a command and returns its `result`; events that arrive meanwhile
    /// are kept in `events`.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send to DevTools");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no DevTools answer to {method} within 30 s"))
                .expect("DevTools connection open")
                .expect("DevTools read");
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["id"] == id {
                if let Some(error) = value.get("error") {
                    panic!("{method} failed: {error}");
                }
                return value["result"].clone();
            }
            if value.get("method").is_some() {
                self.events.push(value);
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting promises) and returns its
    /// value; panics on a JavaScript exception.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("JavaScript exception in {expression}:\n{exception:#}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy and returns that value.
    async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                let state = self.page_state().await;
                panic!("not within {PAGE_WAIT:?}: {what}\npage state: {state:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the page shows, for failure messages.
    async fn page_state(&mut self) -> Value {
        self.eval(
            r##"({
                href: location.href.slice(0, 60),
                nav: performance.getEntriesByType("navigation")[0]?.type,
                age: Math.round(performance.now()),
                state: document.body && document.body.dataset.state,
                status: document.getElementById("state-text")?.textContent,
                lastClose: document.getElementById("last-close")?.textContent,
                log: [...document.querySelectorAll("#log li")].slice(0, 40).map(li => li.textContent),
                ids: [...document.querySelectorAll("[data-notification-id]")].map(e => e.dataset.notificationId),
            })"##,
        )
        .await
    }

    async fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({"url": url})).await;
        assert!(
            result.get("errorText").is_none(),
            "navigate {url}: {result}"
        );
        self.wait_for("page loaded", "document.readyState === 'complete'")
            .await;
    }

    /// The text content of the element with id `id`.
    async fn text_of(&mut self, id: &str) -> Value {
        let expression = format!("document.getElementById({}).textContent", json!(id));
        self.eval(&expression).await
    }

    /// Waits until the element with id `id` shows `text` (`what` names it
    /// in the failure message).
    async fn wait_for_text(&mut self, what: &str, id: &str, text: &str) {
        let expression = format!(
            "document.getElementById({}).textContent.includes({})",
            json!(id),
            json!(text)
        );
        self.wait_for(what, &expression).await;
    }

    /// Joins `channel` with the demo page's channel field and button.
    async fn subscribe_in_page(&mut self, channel: &str) {
        self.eval(&format!(
            "document.getElementById('channel').value = {}; \
             document.getElementById('subscribe').click()",
            json!(channel)
        ))
        .await;
    }

    /// The text of `[data-notification-id="ID"]` once it is there.
    async fn notification_text(&mut self, id: &str) -> String {
        let expression = format!(
            "document.querySelector('[data-notification-id=\"' + CSS.escape({}) + '\"]')?.textContent",
            json!(id)
        );
        self.wait_for(&format!("notification {id} shown"), &expression)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Sets the viewport, then saves a screenshot of the whole page.
    async fn screenshot(&mut self, width: u32, height: u32, mobile: bool, path: &Path) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        // Let layout settle after the resize.
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            .await;
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await;
        let content = &metrics["cssContentSize"];
        let full_height = content["height"].as_f64().unwrap_or(height as f64).ceil();
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": full_height, "scale": 1}
                }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot data");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
    }

    /// Fails if the page threw an uncaught exception or opened a dialog.
    fn assert_no_page_errors(&self) {
        let bad: Vec<&Value> = self
            .events
            .iter()
            .filter(|e| {
                e["method"] == "Runtime.exceptionThrown"
                    || e["method"] == "Page.javascriptDialogOpening"
            })
            .collect();
        assert!(bad.is_empty(), "page errors or dialogs: {bad:#?}");
    }
}

/// Chromium with the page it opened at start, or None when the test is
/// skipped (see `chromium_binary`).
async fn open_browser() -> Option<(Browser, Cdp)> {
    let browser = Browser::launch(&chromium_binary()?);
    let page = browser.page().await;
    Some((browser, page))
}

/// How a test of the demo page ends: the page threw nothing, and the
/// browser is gone before the bridge stops (so the bridge's shutdown does
/// not wait on the page's socket).
async fn finish(page: Cdp, browser: Browser, bridge: Bridge) {
    page.assert_no_page_errors();
    drop(page);
    drop(browser);
    bridge.stop().await;
}

/// GET on Chromium's DevTools HTTP endpoint (which keeps the connection
/// open: the body is read by its Content-Length).
async fn devtools_get(addr: SocketAddr, path: &str) -> String {
    let reply = http_request(addr, "GET", path, &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------
// A little HTTP for the admin routes
// ---------------------------------------------------------------------------

async fn http(addr: SocketAddr, method: &str, path: &str, key: &str) -> (u16, String) {
    let auth = format!("Bearer {key}");
    let reply = http_request(addr, method, path, &[("Authorization", &auth)], "").await;
    (reply.status, reply.body)
}

/// The ids of user `user`'s open connections on `bridge`.
async fn connection_ids(bridge: &Bridge, user: &str) -> Vec<String> {
    let (status, body) = http(
        bridge.running().http_addr,
        "GET",
        &format!("/api/connections?user_id={user}"),
        ADMIN_KEY,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

async fn start_bridge(tweak: impl FnOnce(&mut notify_bridge::config::Config)) -> Bridge {
    Bridge::start_with(|c| {
        c.http.api_keys = vec![API_KEY.into()];
        c.http.admin_keys = vec![ADMIN_KEY.into()];
        c.http.dev_tokens = true;
        c.websocket.public_channels = vec!["public:*".into()];
        tweak(c);
    })
    .await
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn demo_page_receives_sends_reconnects_and_fits_a_phone() {
    let Some((browser, mut page)) = open_browser().await else {
        return;
    };
    let bridge = start_bridge(|_| {}).await;
    let publisher = Publisher::connect().await;
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;

    // The page comes with its settings and its own assets.
    let http_addr = bridge.running().http_addr;
    let (status, css) = http_get(http_addr, "/assets/demo.css").await;
    assert_eq!(status, 200);
    assert!(css.contains("@media"), "{css}");

    // 1. `/?token=T` connects at once; the welcome's connection id is shown.
    let token = token("1", &[]);
    page.navigate(&format!("http://{http_addr}/?token={token}"))
        .await;
    page.wait_for("connected state", "document.body.dataset.state === 'open'")
        .await;
    let shown_id = page
        .wait_for(
            "connection id shown",
            "document.getElementById('connection-id').textContent.startsWith('c-') && document.getElementById('connection-id').textContent",
        )
        .await;
    assert_eq!(
        connection_ids(&bridge, "1").await,
        vec![shown_id.as_str().unwrap().to_string()],
        "the page shows the welcome's connection_id"
    );
    // The token left the address bar (and the history entry): the page
    // connected with a one-time ticket instead.
    let href = page.eval("location.href").await;
    assert_eq!(href, Value::from(format!("http://{http_addr}/")), "{href}");
    let ws_url = page.text_of("ws-url").await;
    let ws_url = ws_url.as_str().unwrap_or_default();
    assert!(
        ws_url.contains("ticket=") && !ws_url.contains("token="),
        "{ws_url}"
    );

    // 2. A message over AMQP appears, payload JSON as sent (the big integer
    // is not rounded as JSON.parse would).
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 1, "id": "amqp-1", "event": "order.shipped",
                "payload": {"text": "hello from AMQP", "order": 12345678901234567890}}"#,
        )
        .await;
    let text = page.notification_text("amqp-1").await;
    assert!(text.contains("hello from AMQP"), "{text}");
    assert!(text.contains("12345678901234567890"), "{text}");
    assert!(text.contains("order.shipped"), "{text}");

    // 2b. Escapes as Python's json.dumps writes them are shown decoded, and
    // what JSON needs escaped stays escaped; numbers stay as received.
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 1, "id": "escaped-1",
                "payload": {"text": "done \u2713 caf\u00e9", "quote": "say \"hi\"", "n": 98765432109876543210}}"#,
        )
        .await;
    page.notification_text("escaped-1").await;
    let shown = page
        .eval("document.querySelector('[data-notification-id=\"escaped-1\"] pre.payload').textContent")
        .await;
    let shown = shown.as_str().unwrap_or_default();
    assert!(shown.contains(r#""done ✓ café""#), "{shown}");
    assert!(!shown.contains(r"\u2713"), "{shown}");
    assert!(shown.contains(r#""say \"hi\"""#), "{shown}");
    assert!(shown.contains("98765432109876543210"), "{shown}");

    // 3. HTML in a payload is shown as text, never parsed.
    let evil = "<img src=x onerror=alert(1)>";
    bridge
        .publish(
            &publisher,
            &json!({"user_id": 1, "id": "xss-1", "payload": {"html": evil}}).to_string(),
        )
        .await;
    let text = page.notification_text("xss-1").await;
    assert!(text.contains(evil), "{text}");
    assert_eq!(
        page.eval("document.querySelectorAll('img').length").await,
        0,
        "an <img> element was created from a payload"
    );

    // 4. Another user's message never shows up (the marker after it does).
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 2, "id": "for-user-2", "payload": {"text": "not yours"}}"#,
        )
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 1, "id": "marker-1", "payload": {"text": "marker"}}"#,
        )
        .await;
    page.notification_text("marker-1").await;
    assert_eq!(
        page.eval("document.querySelector('[data-notification-id=\"for-user-2\"]') === null")
            .await,
        true
    );

    // 5. Channels: subscribe from the page; a refused one shows the error frame.
    page.subscribe_in_page("public:news").await;
    page.wait_for_text("subscribed shown", "channels", "public:news")
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"channel": "public:news", "id": "chan-1", "payload": {"headline": "channel news"}}"#,
        )
        .await;
    let text = page.notification_text("chan-1").await;
    assert!(
        text.contains("channel news") && text.contains("channel public:news"),
        "{text}"
    );
    page.subscribe_in_page("secret").await;
    page.wait_for_text(
        "error frame for a refused channel shown",
        "log",
        "error forbidden",
    )
    .await;

    // 6. The send form: a wrong key shows 401; the right one 202, and the
    // notification it sent arrives in the page.
    let fill_form = |key: &str, text: &str| {
        format!(
            "document.getElementById('api-key').value = {key}; \
             document.getElementById('target-kind').value = 'user_id'; \
             document.getElementById('target').value = '1'; \
             document.getElementById('payload').value = {payload}; \
             document.getElementById('send-result').removeAttribute('data-status'); \
             document.getElementById('send').click()",
            key = json!(key),
            payload = json!(json!({"text": text}).to_string()),
        )
    };
    page.eval(&fill_form("wrong-key", "refused")).await;
    let status = page
        .wait_for(
            "answer to a send with a wrong key",
            "document.getElementById('send-result').dataset.status",
        )
        .await;
    assert_eq!(status, "401");
    page.eval(&fill_form(API_KEY, "sent from the form")).await;
    let status = page
        .wait_for(
            "answer to the send form",
            "document.getElementById('send-result').dataset.status",
        )
        .await;
    let answer = page.text_of("send-result").await;
    assert_eq!(status, "202", "{answer}");
    let answer = answer.as_str().unwrap();
    let body: Value = serde_json::from_str(answer.split_once('\n').unwrap().1).unwrap();
    assert_eq!(body["status"], "queued", "{answer}");
    let sent_id = body["id"].as_str().unwrap();
    let text = page.notification_text(sent_id).await;
    assert!(text.contains("sent from the form"), "{text}");

    // 7. Screenshots: desktop, then phone width without sideways scrolling.
    let target = target_dir();
    page.screenshot(1280, 900, false, &target.join("demo-screenshot.png"))
        .await;
    page.screenshot(390, 844, true, &target.join("demo-screenshot-mobile.png"))
        .await;
    let scroll_width = page.eval("document.documentElement.scrollWidth").await;
    assert!(
        scroll_width.as_u64().unwrap() <= 390,
        "the page is {scroll_width} px wide at a 390 px viewport"
    );
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;

    // 8. The bridge restarts on the same ports (the page gets a ticket for
    // each connection from the side port that served it): the page shows the
    // 1001 close, reconnects with backoff, and receives again.
    let (ws_addr, http_addr) = (bridge.running().ws_addr, bridge.running().http_addr);
    let before = page.text_of("connection-id").await;
    bridge.stop().await;
    // (The page may already have retried, and failed, while the old bridge
    // was cleaning up: the 1001 is in the log, not necessarily the last close.)
    page.wait_for_text("1001 shown", "log", "closed: 1001")
        .await;
    page.wait_for(
        "reconnecting state",
        "['reconnecting', 'connecting'].includes(document.body.dataset.state)",
    )
    .await;
    let bridge = start_bridge(|c| {
        c.websocket.listen = ws_addr;
        c.http.listen = http_addr;
    })
    .await;
    page.wait_for("reconnected", "document.body.dataset.state === 'open'")
        .await;
    let after = connection_ids(&bridge, "1").await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        page.text_of("connection-id").await,
        after[0],
        "the new connection id is shown (was {before})"
    );
    // Channels joined before the drop are joined again.
    page.wait_for_text("public:news joined again", "channels", "public:news")
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id": "1", "id": "after-restart", "payload": {"text": "back again"}}"#,
        )
        .await;
    assert!(page
        .notification_text("after-restart")
        .await
        .contains("back again"));

    // 9. An admin closes the connection (1008): the page shows the reason
    // and stops; it does not reconnect.
    let (status, body) = http(
        bridge.running().http_addr,
        "DELETE",
        &format!("/api/connections/{}", after[0]),
        ADMIN_KEY,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    page.wait_for("stopped state", "document.body.dataset.state === 'stopped'")
        .await;
    let status_text = page.text_of("state-text").await;
    assert!(
        status_text.as_str().unwrap().contains("1008"),
        "{status_text}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        connection_ids(&bridge, "1").await.is_empty(),
        "the page reconnected after a 1008"
    );

    finish(page, browser, bridge).await;
}

#[tokio::test]
async fn demo_page_in_auth_none_mode_connects_with_user_id_and_gets_tokens_only_when_enabled() {
    let Some((browser, mut page)) = open_browser().await else {
        return;
    };
    let bridge = start_bridge(|c| {
        c.auth.mode = AuthMode::None;
        c.http.dev_tokens = false;
    })
    .await;
    let publisher = Publisher::connect().await;

    let http_addr = bridge.running().http_addr;
    page.navigate(&format!(
        "http://{http_addr}/?user_id=alice&channel=public:room"
    ))
    .await;
    page.wait_for("connected", "document.body.dataset.state === 'open'")
        .await;
    assert_eq!(page.text_of("welcome-user").await, "alice");
    // ?channel= is joined after the welcome.
    page.wait_for_text("public:room joined", "channels", "public:room")
        .await;
    // No token UI in none mode, and no dev-token button without dev_tokens.
    assert_eq!(
        page.eval(
            "[getComputedStyle(document.querySelector('.auth-jwt')).display, \
              getComputedStyle(document.querySelector('.auth-none')).display, \
              getComputedStyle(document.querySelector('.dev-only')).display]"
        )
        .await,
        json!(["none", "block", "none"])
    );
    bridge
        .publish(
            &publisher,
            r#"{"user_id": "alice", "id": "none-1", "payload": {"text": "hi alice"}}"#,
        )
        .await;
    assert!(page.notification_text("none-1").await.contains("hi alice"));

    finish(page, browser, bridge).await;
}

#[tokio::test]
async fn dev_token_button_and_the_client_js_example_work_in_the_browser() {
    let Some((browser, mut page)) = open_browser().await else {
        return;
    };
    let bridge = start_bridge(|_| {}).await;
    let publisher = Publisher::connect().await;
    let http_addr = bridge.running().http_addr;

    // The "get token" button fetches /api/dev/token and connects.
    page.navigate(&format!("http://{http_addr}/")).await;
    assert_eq!(
        page.eval("document.body.dataset.state").await,
        "idle",
        "no token in the URL: the page waits"
    );
    page.eval(
        "document.getElementById('token-user').value = '7'; \
         document.getElementById('get-token').click()",
    )
    .await;
    page.wait_for("connected as 7", "document.body.dataset.state === 'open'")
        .await;
    assert_eq!(page.text_of("welcome-user").await, "7");
    assert!(page
        .eval("document.getElementById('token').value")
        .await
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));

    // examples/client.js, loaded as a plain script, receives as user 8.
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/client.js"))
            .unwrap();
    page.eval(&source).await;
    let url = bridge.ws_url("/ws");
    page.eval(&format!(
        "window.got = []; window.states = []; \
         window.client = connectNotifications({{ url: {url}, token: {token}, \
            onNotification: (n) => got.push(n), onState: (s) => states.push(s) }}); true",
        url = json!(url),
        token = json!(token("8", &[])),
    ))
    .await;
    page.wait_for("client.js connected", "states.includes('open')")
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id": 8, "id": "js-1", "payload": {"text": "hello client.js"}}"#,
        )
        .await;
    let got = page
        .wait_for("client.js got the notification", "got.length > 0 && got")
        .await;
    assert_eq!(got[0]["id"], "js-1", "{got}");
    assert_eq!(got[0]["payload"]["text"], "hello client.js", "{got}");
    page.eval("client.close()").await;
    page.wait_for("client.js closed", "states.includes('closed')")
        .await;

    finish(page, browser, bridge).await;
}

/// docs/management-ui.md, followed literally in the RabbitMQ management UI:
/// log in, open the exchange, "Publish message" with the routing key, a
/// JSON payload (the UI sends no content type) and a `message_id` property,
/// and the user's socket gets it with that id. Skipped when no management UI
/// answers.
#[tokio::test]
async fn management_ui_publish_reaches_a_socket() {
    let Some((browser, mut page)) = open_browser().await else {
        return;
    };
    let port: u16 = std::env::var("MANAGEMENT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(15672);
    let management = SocketAddr::from(([127, 0, 0, 1], port));
    if tokio::net::TcpStream::connect(management).await.is_err() {
        eprintln!("SKIPPED: no RabbitMQ management UI on {management} (scripts/rabbitmq start enables it)");
        return;
    }
    let bridge = start_bridge(|_| {}).await;
    let mut client = bridge.connect("1").await;

    // Step 1: log in as guest / guest.
    page.navigate(&format!("http://{management}/")).await;
    page.wait_for(
        "login form",
        "document.querySelector('input[name=username]') !== null",
    )
    .await;
    // The login script may bind its handler after the form shows: submit
    // (again) every 2 s until the overview replaces the form.
    page.wait_for(
        "logged in",
        "(() => { \
           const user = document.querySelector('input[name=username]'); \
           if (!user) return document.body.innerText.includes('Exchanges'); \
           if (!window.loginAt || Date.now() - window.loginAt > 2000) { \
             window.loginAt = Date.now(); \
             user.value = 'guest'; \
             document.querySelector('input[name=password]').value = 'guest'; \
             document.querySelector('input[type=submit]').click(); \
           } \
           return false; })()",
    )
    .await;

    // Steps 2-3: Exchanges → the exchange → "Publish message".
    let exchange = &bridge.config.amqp.exchange;
    page.navigate(&format!("http://{management}/#/exchanges/%2F/{exchange}"))
        .await;
    let find_section = "[...document.querySelectorAll('h2')].find(h => h.textContent.trim() === 'Publish message')";
    page.wait_for(
        "the Publish message section",
        &format!("{find_section} !== undefined"),
    )
    .await;
    page.eval(&format!("{find_section}.click()")).await;

    // Step 4: routing key and payload; then the button.
    let form = "[...document.querySelectorAll('form')].find(f => f.querySelector('textarea[name=payload]'))";
    // The id comes from the message_id property (docs: "Properties").
    let payload = r#"{"user_id": 1, "payload": {"text": "hello from the management UI"}}"#;
    page.wait_for("the publish form", &format!("{form} !== undefined"))
        .await;
    page.eval(&format!(
        "(() => {{ const f = {form}; \
           f.querySelector('input[name=routing_key]').value = 'notifications.send'; \
           f.querySelector('textarea[name=payload]').value = {payload}; \
           f.querySelector('input[name=props_1_mfkey]').value = 'message_id'; \
           f.querySelector('input[name=props_1_mfvalue]').value = 'ui-1'; \
           f.querySelector('input[type=submit]').click(); }})()",
        payload = json!(payload)
    ))
    .await;
    page.wait_for(
        "'Message published.'",
        "document.body.innerText.includes('Message published.')",
    )
    .await;
    let routed = page
        .eval("document.body.innerText.includes('but not routed')")
        .await;
    assert_eq!(routed, false, "the UI says the message was not routed");

    let frame = next_json(&mut client).await;
    assert_eq!(frame["id"], "ui-1", "{frame}");
    assert_eq!(frame["payload"]["text"], "hello from the management UI");

    drop(page);
    drop(browser);
    bridge.stop().await;
}

#[tokio::test]
async fn demo_page_with_the_inbox_replays_counts_marks_read_and_resumes_after_a_reload() {
    let Some((browser, mut page)) = open_browser().await else {
        return;
    };
    let store = ScratchStore::new();
    let bridge = start_bridge(with_inbox(store.path())).await;
    let publisher = Publisher::connect().await;
    // Two notifications while the user is offline.
    for id in ["off-1", "off-2"] {
        bridge
            .publish(
                &publisher,
                &json!({"user_id": "in", "id": id, "payload": {"text": id}}).to_string(),
            )
            .await;
    }
    wait_for_stored(&bridge, 2).await;

    let http_addr = bridge.running().http_addr;
    let url = format!("http://{http_addr}/?token={}", token("in", &[]));
    page.navigate(&url).await;
    // First visit: since=0 replays both, and the badge shows the inbox's count.
    page.notification_text("off-1").await;
    page.notification_text("off-2").await;
    wait_for_unread(&mut page, "2 unread", 2).await;

    // Clicking a stored notification marks it read; the counts frame updates the badge.
    page.eval("document.querySelector('[data-notification-id=\"off-1\"] pre').click()")
        .await;
    wait_for_unread(&mut page, "1 unread after the click", 1).await;

    // A live one arrives with the next seq; the badge follows.
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"in","id":"live-3","payload":{"text":"live"}}"#,
        )
        .await;
    page.notification_text("live-3").await;
    wait_for_unread(&mut page, "2 unread with the live one", 2).await;

    // Reload: the page reconnects with since=3, so nothing is replayed twice,
    // and what came while it was away arrives.
    page.navigate(&url).await;
    page.wait_for("connected again", "document.body.dataset.state === 'open'")
        .await;
    bridge
        .publish(
            &publisher,
            r#"{"user_id":"in","id":"after-4","payload":{"text":"after"}}"#,
        )
        .await;
    page.notification_text("after-4").await;
    let ids = page
        .eval("[...document.querySelectorAll('[data-notification-id]')].map(e => e.dataset.notificationId).join(',')")
        .await;
    assert_eq!(
        ids, "after-4",
        "a reload with since must not replay what was seen"
    );
    assert_eq!(
        page.eval("localStorage.getItem('notify-bridge.demo.since.in')")
            .await,
        "4"
    );
    finish(page, browser, bridge).await;
}

/// Waits until the demo page's badge says exactly `n` unread.
async fn wait_for_unread(page: &mut Cdp, what: &str, n: u64) {
    let expression = format!("document.getElementById('unread').textContent === '{n} unread'");
    page.wait_for(what, &expression).await;
}

/// Serves one small page to every request on 127.0.0.1, as a site of
/// another origin would; returns its address.
async fn serve_other_site() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let body = "<!doctype html><title>another site</title><p>another site</p>";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

/// Opens a WebSocket from the page with no token of its own (the browser
/// adds its cookies and the page's Origin); the first frame's text, or
/// "refused" when the handshake fails.
async fn socket_from_page(page: &mut Cdp, ws_url: &str) -> String {
    let script = format!(
        "new Promise(done => {{ const ws = new WebSocket({ws_url:?}); \
         ws.onmessage = e => {{ done(e.data); ws.close(); }}; \
         ws.onerror = () => done('refused'); }})"
    );
    page.eval(&script)
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_cookie_connects_from_an_allowed_origin_but_not_from_another_site() {
    let Some((_browser, mut page)) = open_browser().await else {
        return;
    };
    // The side port's origin is the allowed one, so its port is chosen first.
    let http_port = free_port();
    let allowed = format!("http://127.0.0.1:{http_port}");
    let bridge = start_bridge(|c| {
        c.http.listen = format!("127.0.0.1:{http_port}").parse().unwrap();
        c.auth.cookie_name = "nb_token".into();
        c.websocket.allowed_origins = vec![allowed.clone()];
    })
    .await;
    let ws_url = format!("ws://{}/ws", bridge.running().ws_addr);

    // The app (on the allowed origin) sets its cookie; its page connects
    // with no token in the URL.
    page.navigate(&format!("{allowed}/")).await;
    let cookie = format!("nb_token={}; path=/", token("victim", &[]));
    page.eval(&format!("document.cookie = {cookie:?}")).await;
    let first = socket_from_page(&mut page, &ws_url).await;
    let welcome: Value = serde_json::from_str(&first).unwrap_or_else(|_| panic!("{first}"));
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user_id"], "victim", "{welcome}");

    // Another site on the same host (cookies ignore ports, so the browser
    // sends the victim's cookie along) is refused for its origin.
    let other = serve_other_site().await;
    page.navigate(&format!("http://{other}/")).await;
    assert_eq!(
        page.eval("document.cookie.includes('nb_token=')").await,
        Value::Bool(true),
        "the browser holds the cookie for this host"
    );
    assert_eq!(socket_from_page(&mut page, &ws_url).await, "refused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connection_ids(&bridge, "victim").await.is_empty());
    bridge.stop().await;
}
