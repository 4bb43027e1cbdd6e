//! The `notify-bridge` command: run the daemon, mint a token, or show the
//! effective configuration. Configuration errors exit with code 2.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use notify_bridge::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "notify-bridge",
    version,
    about = "Delivers RabbitMQ notifications to users' WebSockets"
)]
struct Cli {
    /// TOML configuration file (default: config/notify-bridge.toml if present).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a JWT for a user, signed with the configured secret.
    Token {
        /// The user id (the token's user claim).
        #[arg(long)]
        user: String,
        /// A channel the token may join; repeat for several.
        #[arg(long = "channel", value_name = "CHANNEL")]
        channels: Vec<String>,
        /// How long the token is valid, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Print the effective configuration, secrets masked.
    CheckConfig,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration like 1h: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("notify-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            // The key file is part of the configuration: check it as the
            // daemon would.
            if let Err(e) = notify_bridge::auth::Authenticator::from_config(&config.auth) {
                eprintln!("notify-bridge: {e}");
                return ExitCode::from(2);
            }
            // So are the TLS files.
            let tls = notify_bridge::tls::ListenersTls::from_config(&config)
                .and_then(|_| notify_bridge::amqp::connect::check(&config.amqp));
            if let Err(e) = tls {
                eprintln!("notify-bridge: {e}");
                return ExitCode::from(2);
            }
            print!("{}", config.to_masked_toml());
            ExitCode::SUCCESS
        }
        Some(Command::Token {
            user,
            channels,
            ttl,
        }) => match notify_bridge::auth::mint(&config.auth, &user, &channels, ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("notify-bridge: {e}");
                ExitCode::from(2)
            }
        },
        None => serve(config),
    }
}

fn serve(config: Config) -> ExitCode {
    use notify_bridge::runtime;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let configured = std::env::var(runtime::WORKER_THREADS_VAR).ok();
    let workers = match runtime::worker_threads(cores, configured.as_deref()) {
        Ok(workers) => workers,
        Err(e) => {
            eprintln!("notify-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    tracing::info!(worker_threads = workers, cores, "starting the runtime");
    let runtime = match runtime::build(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("notify-bridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        notify_bridge::shutdown::cancel_on_signal(shutdown.clone());
        match notify_bridge::run(config, shutdown).await {
            Ok(running) => match running.wait().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("notify-bridge: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                // Logging is set up by now: one line, in the configured format.
                tracing::error!("notify-bridge: {e:#}");
                if e.downcast_ref::<notify_bridge::config::ConfigError>()
                    .is_some()
                {
                    ExitCode::from(2)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}

fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    let mut directives = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone());
    // lapin logs a channel closed by a failed passive declare (a missing
    // exchange, on every fresh deploy) as an ERROR; every broker failure
    // that matters is logged by the bridge itself with its reason. Its own
    // logs stay available with an explicit `lapin=…` directive.
    if !directives.contains("lapin") {
        directives.push_str(",lapin=off");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
