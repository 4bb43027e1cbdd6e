//! Usage: cargo run --example publish -- --user 1 --text hello   (all flags: --help)
//!
//! Publishes one notification to notify-bridge over AMQP with lapin, the way
//! a Rust service would: a JSON body on `notifications_exchange` with routing
//! key `notifications.send`, publisher confirms on, `mandatory` so that a
//! message no queue receives is reported instead of silently dropped.
//!
//! ```text
//! cargo run --example publish -- --user 1 --text hello
//! cargo run --example publish -- --channel public:news --event news --payload '{"headline":"hi"}'
//! cargo run --example publish -- --broadcast --text "maintenance at 18:00" --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! Arguments are parsed by hand to keep the example free of extra crates.

use std::process::ExitCode;

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Connection, ConnectionProperties,
};
use serde_json::{json, Map, Value};

const USAGE: &str = "\
usage: cargo run --example publish -- TARGET [OPTIONS]

TARGET (exactly one):
  --user ID            one user
  --users ID,ID,...    several users
  --channel NAME       everyone in a channel
  --broadcast          everyone connected

OPTIONS:
  --text TEXT          payload {\"text\": TEXT} (default: hello)
  --payload JSON       the payload as JSON text (instead of --text)
  --event NAME         event name (bridge default: notification)
  --id ID              notification id (default: a new UUID v7)
  --no-store           \"store\": false (keep it out of the inbox)
  --amqp-url URL       default: $NOTIFY_BRIDGE_AMQP_URL or amqp://guest:guest@127.0.0.1:5672/%2f
  --exchange NAME      default: notifications_exchange
  --routing-key KEY    default: notifications.send";

struct Args {
    amqp_url: String,
    exchange: String,
    routing_key: String,
    target: (&'static str, Value),
    payload: Value,
    event: Option<String>,
    id: String,
    store: bool,
}

/// `1` and `"1"` are the same user to the bridge; digits go as a number.
fn user_id(text: &str) -> Value {
    text.parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(text))
}

fn parse_args() -> Result<Args, String> {
    let mut amqp_url = std::env::var("NOTIFY_BRIDGE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut exchange = "notifications_exchange".to_string();
    let mut routing_key = "notifications.send".to_string();
    let mut targets = Vec::new();
    let mut payload = None;
    let mut text = "hello".to_string();
    let mut event = None;
    let mut id = None;
    let mut store = true;

    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--user" => targets.push(("user_id", user_id(&value()?))),
            "--users" => {
                let ids: Vec<Value> = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(user_id)
                    .collect();
                targets.push(("user_ids", Value::from(ids)));
            }
            "--channel" => targets.push(("channel", Value::from(value()?))),
            "--broadcast" => targets.push(("broadcast", Value::Bool(true))),
            "--text" => text = value()?,
            "--payload" => {
                let raw = value()?;
                payload = Some(
                    serde_json::from_str(&raw)
                        .map_err(|e| format!("--payload is not JSON: {e}"))?,
                );
            }
            "--event" => event = Some(value()?),
            "--id" => id = Some(value()?),
            "--no-store" => store = false,
            "--amqp-url" => amqp_url = value()?,
            "--exchange" => exchange = value()?,
            "--routing-key" => routing_key = value()?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let target = match targets.len() {
        1 => targets.remove(0),
        0 => return Err("give a target: --user, --users, --channel or --broadcast".into()),
        _ => return Err("give only one target".into()),
    };
    Ok(Args {
        amqp_url,
        exchange,
        routing_key,
        target,
        payload: payload.unwrap_or_else(|| json!({ "text": text })),
        event,
        id: id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        store,
    })
}

/// The body the bridge expects: one kind of target, a payload, options.
fn body(args: &Args) -> Value {
    let mut body = Map::new();
    body.insert(args.target.0.into(), args.target.1.clone());
    body.insert("payload".into(), args.payload.clone());
    body.insert("id".into(), Value::from(args.id.as_str()));
    if let Some(event) = &args.event {
        body.insert("event".into(), Value::from(event.as_str()));
    }
    if !args.store {
        body.insert("store".into(), Value::Bool(false));
    }
    Value::Object(body)
}

async fn publish(args: &Args) -> Result<(), String> {
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!(
                "cannot connect to {}: {e} (is the broker up? scripts/rabbitmq start)",
                args.amqp_url
            )
        })?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;

    let body = body(args).to_string();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(args.id.as_str().into())
        .with_delivery_mode(2); // persistent
    let confirmation = channel
        .basic_publish(
            args.exchange.as_str().into(),
            args.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.as_bytes(),
            properties,
        )
        .await
        .map_err(|e| format!("publish failed: {e}"))?
        .await
        .map_err(|e| {
            format!(
                "publish failed: {e} (does the exchange {:?} exist? the bridge declares it at startup)",
                args.exchange
            )
        })?;
    let result = if !confirmation.is_ack() {
        Err("the broker refused (nacked) the message".to_string())
    } else if confirmation.take_message().is_some() {
        Err(format!(
            "the broker routed the message to no queue: no bridge queue is bound to {:?} with {:?} \
             (start the bridge once: scripts/demo)",
            args.exchange, args.routing_key
        ))
    } else {
        println!("published id={}: {body}", args.id);
        Ok(())
    };
    let _ = connection.close(200, "bye".into()).await;
    result
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("publish: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match publish(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("publish: {e}");
            ExitCode::FAILURE
        }
    }
}
