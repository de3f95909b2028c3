//! A WebSocket load client for the benchmarks (`benches/load/run.sh`).
//!
//! Opens `--streams` WebSocket streams to `--url` (the stub's `/v1/agent/converse`, which
//! echoes binary frames), then on each stream sends a `--frame`-byte binary frame every
//! `--interval-ms` for `--duration` seconds. Each frame carries its send time, so the echo
//! gives the round trip. Prints one line of `key=value` figures at the end.
//!
//! With `--idle` it only opens the streams, prints `opened=N` once they are all open,
//! holds them for `--duration` seconds from then without sending, and closes them.
//!
//! Usage: `cargo run --release --example ws_load -- --url ws://127.0.0.1:8080/v1/agent/converse
//! --streams 200 --duration 20`

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

struct Args {
    url: String,
    streams: usize,
    duration: Duration,
    interval: Duration,
    frame: usize,
    idle: bool,
}

/// What one stream saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    received: u64,
    /// Round trips in microseconds.
    rtts: Vec<u32>,
    error: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: String::new(),
        streams: 200,
        duration: Duration::from_secs(20),
        interval: Duration::from_millis(20),
        frame: 640,
        idle: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--streams" => args.streams = number(value()?)? as usize,
            "--duration" => args.duration = Duration::from_secs(number(value()?)?),
            "--interval-ms" => args.interval = Duration::from_millis(number(value()?)?),
            "--frame" => args.frame = (number(value()?)? as usize).max(8),
            "--idle" => args.idle = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.url.is_empty() {
        return Err("--url is required".into());
    }
    Ok(args)
}

async fn stream(
    args: &Args,
    epoch: Instant,
    start_at: tokio::time::Instant,
    opened: tokio::sync::mpsc::Sender<()>,
    mut all_open: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
) -> Tally {
    let mut tally = Tally::default();
    // tungstenite's default 128 KiB read buffer is zero-filled up to its capacity before
    // every read: a memset of up to 128 KiB per frame, and 1.2 GB at 10,000 streams.
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let (ws, _) =
        match tokio_tungstenite::connect_async_with_config(args.url.as_str(), Some(config), false)
            .await
        {
            Ok(ok) => ok,
            Err(e) => {
                tally.error = Some(format!("connect: {e}"));
                drop(opened);
                return tally;
            }
        };
    let _ = opened.send(()).await;
    drop(opened);
    let (mut tx, mut rx) = ws.split();
    if args.idle {
        // Read (and ignore) whatever the upstream sends, so pings are answered, until
        // `--duration` after the last stream opened: opening 10,000 can take half a minute.
        let held = async {
            // An error is `run` gone, and the streams with it.
            let at = all_open
                .wait_for(Option::is_some)
                .await
                .map_or(None, |at| *at);
            if let Some(at) = at {
                tokio::time::sleep_until(at + args.duration).await;
            }
        };
        tokio::select! {
            () = held => {}
            () = async { while rx.next().await.is_some() {} } => {}
        }
        let _ = tx.send(Message::Close(None)).await;
        return tally;
    }
    // Spread the streams' send times over one interval.
    let phase = Duration::from_nanos(fastrand::u64(..args.interval.as_nanos() as u64));
    let mut ticks = tokio::time::interval_at(start_at + phase, args.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = start_at + args.duration;
    let mut payload = vec![0u8; args.frame];
    // After the last send, wait a little for the echoes still in flight.
    let drain_until = end + Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = ticks.tick(), if tokio::time::Instant::now() < end => {
                let now = epoch.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&now.to_le_bytes());
                if let Err(e) = tx.send(Message::Binary(payload.clone().into())).await {
                    tally.error = Some(format!("send: {e}"));
                    break;
                }
                tally.sent += 1;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(data))) if data.len() >= 8 => {
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&data[..8]);
                    let sent = u64::from_le_bytes(t);
                    let rtt = (epoch.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000;
                    tally.rtts.push(rtt.min(u32::MAX as u64) as u32);
                    tally.received += 1;
                    if tokio::time::Instant::now() >= end && tally.received >= tally.sent {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tally.error = Some(format!("receive: {e}"));
                    break;
                }
                None => {
                    tally.error = Some("closed by the server".into());
                    break;
                }
            },
            _ = tokio::time::sleep_until(drain_until) => break,
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    tally
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn run(args: Args) -> Result<(), String> {
    let args: &'static Args = Box::leak(Box::new(args));
    let epoch = Instant::now();
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(args.streams.max(1));
    let open_started = Instant::now();
    // Every stream starts sending at once, after they have all had time to connect.
    let start_at = tokio::time::Instant::now()
        + Duration::from_secs(2)
        + args.streams as u32 * Duration::from_micros(500);
    let (all_open_tx, all_open) = tokio::sync::watch::channel(None);
    let mut tasks = Vec::with_capacity(args.streams);
    for _ in 0..args.streams {
        let opened = opened_tx.clone();
        let all_open = all_open.clone();
        tasks.push(tokio::spawn(stream(
            args, epoch, start_at, opened, all_open,
        )));
    }
    drop(opened_tx);
    let mut opened = 0usize;
    while opened_rx.recv().await.is_some() {
        opened += 1;
    }
    all_open_tx.send_replace(Some(tokio::time::Instant::now()));
    let mut stdout = tokio::io::stdout();
    let line = format!(
        "opened={opened} open_secs={:.2}\n",
        open_started.elapsed().as_secs_f64()
    );
    let _ = stdout.write_all(line.as_bytes()).await;
    let _ = stdout.flush().await;

    let mut total = Tally::default();
    let mut errors = 0usize;
    let mut first_error = None;
    for task in tasks {
        let t = task
            .await
            .map_err(|e| format!("a stream task failed: {e}"))?;
        total.sent += t.sent;
        total.received += t.received;
        total.rtts.extend(t.rtts);
        if let Some(e) = t.error {
            errors += 1;
            first_error.get_or_insert(e);
        }
    }
    total.rtts.sort_unstable();
    let line = format!(
        "streams={} opened={opened} errors={errors} sent={} received={} rtt_p50_us={} rtt_p99_us={} rtt_max_us={}{}\n",
        args.streams,
        total.sent,
        total.received,
        percentile(&total.rtts, 0.50),
        percentile(&total.rtts, 0.99),
        total.rtts.last().copied().unwrap_or(0),
        first_error
            .map(|e| format!(" first_error=\"{e}\""))
            .unwrap_or_default(),
    );
    let _ = stdout.write_all(line.as_bytes()).await;
    let _ = stdout.flush().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ws_load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ws_load: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws_load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
