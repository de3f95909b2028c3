//! Switchyard: a blue/green traffic switch for Deepgram self-hosted API containers.
//!
//! # A request's path
//! A client connects to the proxy listener (`listener`), optionally through TLS (`tls`).
//! hyper parses the request; `proxy::Proxy::handle` loads the route table once
//! (`route_table`), checks the client key if `[client_auth]` is set, and takes the
//! active colour (the standby one on the preview listener). Within that colour
//! `upstream::pick` chooses by least outstanding work of two random healthy upstreams.
//! Plain HTTP (`proxy::http`) goes upstream through Switchyard's own HTTP/1.1 client
//! (`proxy::h1`), which runs in the client connection's task on kept connections, bodies
//! streamed both ways, a connect failure retried on another upstream of the same colour.
//! A WebSocket upgrade (`proxy::websocket`) gets its own upstream handshake and a relay
//! task pinned to that colour for its whole life, which passes frames on as they came
//! (`proxy::pump`, `proxy::frames`).
//!
//! # A flip's path
//! `admin` takes `POST /flip`; `control`, the only writer, checks it, writes the state
//! (`store`: the state file, or with the `etcd` feature a key several replicas share and
//! watch) and publishes a new table. New requests see the new colour at once. Streams on
//! the old colour are told through `drain::DrainWatch`; at their deadline the relay ends
//! them the way Deepgram's protocol expects (`deepgram`: which messages, per endpoint)
//! and closes the client with 1012.
//!
//! # Health's path
//! `health` probes each upstream every `health.interval` and counts passes and failures
//! toward `rise` and `fall`; connect errors on live traffic count too
//! (`proxy::Proxy::connect_failed`). Verdicts are kept on the `upstream::Upstream` itself,
//! shared by every table that holds it, so `pick` sees them without a new table; the
//! gauges and `/status` read the same values.
//!
//! # The other modules
//! `app` wires the listeners, tasks and shutdown order; `main.rs` is the CLI. `config`
//! and `duration` read the TOML; `state` is the durable route state and its file;
//! `metrics` the Prometheus registry; `error` the answers Switchyard gives itself;
//! `nofile` the open-file limit and its reserve; `runtime` the tokio runtime's settings;
//! `ctl` the admin API's command-line client; `stub` the Deepgram-compatible upstream for
//! tests, the demo and benchmarks.
//!
//! # Invariants
//! - The route table is immutable and swapped whole; a request loads it once.
//! - No lock is held across `.await`; route changes are serialized by one task instead.
//! - Traffic never crosses colours on its own: retries stay within the colour.
//! - Every stream is counted (`drain::Tracker`) until its task ends, so shutdown and
//!   `/drain/wait` see upgraded connections that hyper no longer tracks.
//! - Buffers are bounded: a read buffer per direction per stream (a frame is never held
//!   whole, except control frames and small text frames a drain must read), 64 KiB heads.
//! - Time is bounded too: a peer that moves no bytes for `limits.stall_timeout` ends its
//!   request or stream (`proxy::stall`; an HTTP/2 stream its client stops reading is reset
//!   by `listener::h2`), and plain answers on a colour that drains end at its deadline.

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod ctl;
pub mod deepgram;
pub mod drain;
pub mod duration;
pub mod error;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod nofile;
pub mod proxy;
pub mod route_table;
pub mod runtime;
pub mod state;
pub mod store;
pub mod stub;
pub mod tls;
pub mod upstream;
