//! Reload: an upstream removed from its pool has its streams drained as in a flip, while
//! the active colour, the other streams and open connections carry on.

mod support;

use futures_util::StreamExt;
use http::StatusCode;
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_removed_upstreams_stream_is_drained_with_the_protocol_aware_close() {
    let builder = EnvBuilder {
        blue: 2,
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let streams = streams_on_each(&env.blue, &env.ws_url("/v1/listen")).await;
    // Remove blue-1 with a short drain.
    let kept = env.blue[0].url();
    let reload = EnvBuilder {
        drain_timeout: "1s",
        ..builder
    };
    env.write_config(
        &reload,
        &format!("\"{kept}\""),
        &format!("\"{}\"", env.green[0].url()),
    );
    let body = env.reload().await;
    assert_eq!(
        body["active"], "blue",
        "a reload leaves the active colour alone"
    );
    let removed_streams = env.blue[1].state.ws_open_now();
    assert!(removed_streams >= 1);
    // The removed upstream is listed while its streams drain, with their deadline.
    let upstreams = body["colors"]["blue"]["upstreams"].as_array().cloned();
    let upstreams = upstreams.expect("upstreams");
    assert_eq!(upstreams.len(), 2, "{body}");
    assert_eq!(upstreams[0]["removed"], false, "{body}");
    assert_eq!(upstreams[1]["removed"], true, "{body}");
    assert_eq!(upstreams[1]["open_streams"], removed_streams, "{body}");
    assert!(upstreams[1]["drain_deadline"].is_string(), "{body}");
    // Its error counts stay while its streams drain (an error then adds to its count);
    // its health goes at once (it takes no new work: a stale 1 would hide a colour left
    // with no healthy upstream).
    let series = format!("upstream=\"{}\"", env.blue[1].url());
    let exposition = env.app().metrics.encode();
    let listed = |family: &str| {
        exposition
            .lines()
            .any(|l| l.starts_with(family) && l.contains(&series))
    };
    assert!(listed("switchyard_upstream_errors_total"), "{exposition}");
    assert!(!listed("switchyard_upstream_healthy"), "{exposition}");
    // Every stream gets audio; those on the removed upstream are then drained.
    let mut drained = 0;
    let mut alive = Vec::new();
    for mut ws in streams {
        let text = answer_to_audio(&mut ws).await;
        assert!(text.contains("\"Results\""), "{text}");
        if text.contains("blue-1") {
            // Drained: the CloseStream final, the Metadata, then 1012.
            let mut saw_metadata = false;
            let close = loop {
                match tokio::time::timeout(PATIENCE, ws.next())
                    .await
                    .expect("in time")
                {
                    Some(Ok(Message::Text(t))) => saw_metadata |= t.contains("\"Metadata\""),
                    Some(Ok(Message::Close(f))) => break f,
                    Some(Ok(_)) => {}
                    other => panic!("no close frame: {other:?}"),
                }
            };
            assert!(saw_metadata);
            assert_eq!(close.map(|f| u16::from(f.code)), Some(1012));
            drained += 1;
        } else {
            alive.push(ws);
        }
    }
    assert_eq!(drained as u64, removed_streams);
    assert_eq!(env.blue[1].state.close_streams(), removed_streams);
    // With its last stream gone, so are its series.
    eventually(|| async { !env.app().metrics.encode().contains(&series) }).await;
    // The kept upstream's streams survived the reload and still work.
    for mut ws in alive {
        let next = answer_to_audio(&mut ws).await;
        assert!(next.contains("blue-0"), "kept streams keep working");
        ws.close(None).await.expect("close");
    }
    let (_, history) = env.admin_get("/history").await;
    let last = &history["history"]
        .as_array()
        .expect("array")
        .last()
        .cloned()
        .expect("entry");
    assert_eq!(last["action"], "reload");
    assert_eq!(last["from"], "blue");
    assert_eq!(last["to"], "blue");
}

/// Opens `/v1/listen` streams at `url` until each of two `stubs` holds at least one (the
/// pick is random).
async fn streams_on_each(stubs: &[switchyard::stub::StubHandle], url: &str) -> Vec<Ws> {
    let mut streams = Vec::new();
    while stubs.iter().any(|s| s.state.ws_open_now() == 0) {
        assert!(
            streams.len() < 64,
            "power of two choices spreads streams over both upstreams"
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("handshake");
        streams.push(ws);
        let opened = streams.len() as u64;
        // Wait for the stub side of the new stream, so the loop condition sees it.
        let (a, b) = (stubs[0].state.clone(), stubs[1].state.clone());
        tokio::time::timeout(PATIENCE, async {
            while a.ws_opened() + b.ws_opened() < opened {
                tokio::select! {
                    _ = a.wait_until(|s| s.ws_opened() + b.ws_opened() >= opened) => {}
                    _ = b.wait_until(|s| s.ws_opened() + a.ws_opened() >= opened) => {}
                }
            }
        })
        .await
        .expect("the stub saw the handshake");
    }
    streams
}

/// A reload that lists a removed upstream again puts it back: its streams stop draining
/// and carry on, still counted on it.
#[tokio::test]
async fn an_upstream_a_reload_puts_back_keeps_its_streams() {
    let builder = EnvBuilder {
        blue: 2,
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let mut streams = streams_on_each(&env.blue, &env.ws_url("/v1/listen")).await;
    let (both, green) = (
        format!("\"{}\", \"{}\"", env.blue[0].url(), env.blue[1].url()),
        format!("\"{}\"", env.green[0].url()),
    );
    let on_removed = env.blue[1].state.ws_open_now();
    env.write_config(&builder, &format!("\"{}\"", env.blue[0].url()), &green);
    env.reload().await;
    let draining = || {
        env.app()
            .tracker
            .counts(switchyard::upstream::Color::Blue)
            .draining_streams
    };
    eventually(|| async { draining() == on_removed }).await;

    env.write_config(&builder, &both, &green);
    let body = env.reload().await;
    eventually(|| async { draining() == 0 }).await;
    let back = &body["colors"]["blue"]["upstreams"][1];
    assert_eq!(back["url"], env.blue[1].url(), "{body}");
    assert_eq!(
        back["open_streams"], on_removed,
        "its streams count on it again: {body}"
    );
    // Every stream still works, and ends as its client chooses.
    for ws in &mut streams {
        let next = answer_to_audio(ws).await;
        assert!(next.contains("\"Results\""), "{next}");
    }
    for mut ws in streams {
        ws.close(None).await.expect("close");
    }
}

/// A standby colour whose streams drain because a reload removed their upstream shows that
/// drain's deadline, not the one of an earlier flip that has passed.
#[tokio::test]
async fn a_standby_colour_draining_a_removed_upstream_shows_its_deadline() {
    let builder = EnvBuilder {
        blue: 2,
        ..Default::default()
    };
    let env = builder.clone().start().await;
    env.flip_draining("green", "0s").await;
    // Preview streams on blue, the standby colour, opened after the flip: not draining.
    let preview = env.app().preview_addr.expect("a preview listener");
    let streams = streams_on_each(&env.blue, &format!("ws://{preview}/v1/listen")).await;
    let reloaded_at = std::time::SystemTime::now();
    env.write_config_of_first_stubs(&builder);
    env.reload().await;
    eventually(|| async {
        env.admin_get("/status").await.1["colors"]["blue"]["state"] == "draining"
    })
    .await;
    let blue = env.admin_get("/status").await.1["colors"]["blue"].clone();
    let deadline = humantime::parse_rfc3339(blue["drain_deadline"].as_str().expect("a deadline"))
        .expect("RFC 3339");
    // The reload's drain.timeout is 30m.
    let from_reload = deadline
        .duration_since(reloaded_at)
        .expect("after the reload");
    assert!(
        from_reload > std::time::Duration::from_secs(29 * 60),
        "{blue}"
    );
    drop(streams);
}

#[tokio::test]
async fn an_upstream_a_reload_adds_is_probed_before_a_flip_can_count_it_healthy() {
    let builder = EnvBuilder::default();
    let env = builder.clone().start().await;
    let blue = format!("\"{}\"", env.blue[0].url());
    // Green's URL now names a node that accepts and never answers.
    let (hung, task) = support::hung_upstream().await;
    env.write_config(&builder, &blue, &format!("\"http://{hung}\""));
    let body = env.reload().await;
    let green = &body["colors"]["green"]["upstreams"][0];
    assert_eq!(green["url"], format!("http://{hung}"));
    assert_eq!(green["healthy"], false, "{green}");
    assert_eq!(green["health"], "unreachable", "{green}");
    let (status, body) = env
        .admin_post("/flip", Some(serde_json::json!({ "to": "green" })))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "target_unhealthy");

    // A live node added by a reload is judged by the same first probe, and serves.
    env.write_config(&builder, &blue, &format!("\"{}\"", env.green[0].url()));
    let body = env.reload().await;
    let green = &body["colors"]["green"]["upstreams"][0];
    assert_eq!(green["healthy"], true, "{green}");
    assert_ne!(green["health"], "unknown", "{green}");
    env.flip("green").await;
    task.abort();
}

/// A reload that shortens `health.interval` applies it at once, not after one more of the
/// old interval.
#[tokio::test]
async fn a_reload_that_shortens_the_health_interval_applies_it_at_once() {
    let slow = EnvBuilder {
        health: "mode = \"deepgram\"\ninterval = \"1h\"\ntimeout = \"1s\"\nrise = 1\nfall = 1",
        ..Default::default()
    };
    let env = slow.clone().start().await;
    let blue = format!("\"{}\"", env.blue[0].url());
    let green = format!("\"{}\"", env.green[0].url());
    // Probes made so far: the first verdict only, with the next an hour away.
    let before = env.blue[0].state.status_requests();
    let fast = EnvBuilder {
        health: EnvBuilder::default().health,
        ..slow
    };
    env.write_config(&fast, &blue, &green);
    env.reload().await;
    env.blue[0].state.set_health("Critical");
    eventually(|| async {
        let (_, status) = env.admin_get("/status").await;
        status["colors"]["blue"]["upstreams"][0]["healthy"] == false
    })
    .await;
    assert!(env.blue[0].state.status_requests() > before);
}

/// POST with the given bearer token → status.
async fn post_with_token(env: &Env, path: &str, token: &str) -> (StatusCode, serde_json::Value) {
    let req = http::Request::post(env.admin_url(path))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    send_json(&env.client, req).await
}

#[tokio::test]
async fn a_reload_takes_a_rotated_admin_token_and_refuses_a_missing_one() {
    let env = EnvBuilder::default().start().await;
    let token_file = env.dir.path().join("admin.token");
    std::fs::write(&token_file, "rotated-token\n").expect("token file");
    let (status, body) = post_with_token(&env, "/reload", TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        post_with_token(&env, "/commit", TOKEN).await.0,
        StatusCode::UNAUTHORIZED,
        "the old token stops working with the reload"
    );
    assert_eq!(
        post_with_token(&env, "/commit", "rotated-token").await.0,
        StatusCode::OK
    );

    // An emptied token file is refused, naming the field, and the token in force stays.
    std::fs::write(&token_file, "  \n").expect("token file");
    let (status, body) = post_with_token(&env, "/reload", "rotated-token").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "admin.token_file", "{body}");
    assert_eq!(
        post_with_token(&env, "/commit", "rotated-token").await.0,
        StatusCode::OK
    );
}

/// A reload's `drain.timeout` is the one the next change of colour gives the streams it
/// leaves: the deadline in `/status` is the flip's time plus the reloaded timeout.
#[tokio::test]
async fn a_reloaded_drain_timeout_applies_to_the_next_flip() {
    let builder = EnvBuilder::default();
    let env = builder.clone().start().await;
    let (stream, _) = tokio_tungstenite::connect_async(env.ws_url("/v1/listen"))
        .await
        .expect("handshake");
    eventually(|| async {
        env.admin_get("/status").await.1["colors"]["blue"]["open_streams"] == 1
    })
    .await;
    env.write_config_of_first_stubs(&EnvBuilder {
        drain_timeout: "7m",
        ..builder
    });
    env.reload().await;
    let (status, flipped) = env.admin_post("/flip", None).await;
    assert_eq!(status, StatusCode::OK, "{flipped}");
    let blue = &flipped["colors"]["blue"];
    assert_eq!(blue["state"], "draining", "{flipped}");
    let at = |v: &serde_json::Value| {
        humantime::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339")
    };
    let drain = at(&blue["drain_deadline"])
        .duration_since(at(&flipped["changed_at"]))
        .expect("deadline after the flip");
    assert!(
        drain.abs_diff(std::time::Duration::from_secs(7 * 60)) <= std::time::Duration::from_secs(2),
        "drain_deadline - changed_at = {drain:?}"
    );
    drop(stream);
}

/// A reload's first probe of an upstream it adds waits at most a few seconds, whatever
/// `health.timeout` says: the reload holds up every other change meanwhile, an urgent
/// rollback too. The upstream is then presumed healthy until its probe loop judges it.
#[tokio::test]
async fn a_reload_does_not_wait_out_a_long_health_timeout() {
    let builder = EnvBuilder {
        health: "mode = \"deepgram\"\ninterval = \"200ms\"\ntimeout = \"1h\"\nrise = 1\nfall = 1",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let blue = format!("\"{}\"", env.blue[0].url());
    let (hung, task) = support::hung_upstream().await;
    env.write_config(&builder, &blue, &format!("\"http://{hung}\""));
    // Without the bound the reload would answer in an hour (the client gives up at 20 s).
    let body = env.reload().await;
    let green = &body["colors"]["green"]["upstreams"][0];
    assert_eq!(green["url"], format!("http://{hung}"));
    assert_eq!(green["health"], "unknown", "{green}");
    // Not judged yet: not a healthy upstream for the flip's gate.
    let (status, body) = env
        .admin_post("/flip", Some(serde_json::json!({ "to": "green" })))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "target_unhealthy");
    // A judged one beside it is, and the change goes through.
    let green = format!("\"{}\", \"http://{hung}\"", env.green[0].url());
    env.write_config(&builder, &blue, &green);
    env.reload().await;
    env.flip("green").await;
    task.abort();
}

/// The grace a drain allows after its deadline is the one in force when the flip was
/// made, as the deadline is: a reload in between changes neither (and a shutdown's exit
/// bound, reckoned from both at SIGTERM, holds).
#[tokio::test]
async fn a_running_drain_keeps_the_grace_it_started_with() {
    let builder = EnvBuilder {
        grace: "1h",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let mut ws = speak_that_never_flushes(&env).await;
    env.flip_draining("green", "3s").await;
    env.write_config_of_first_stubs(&EnvBuilder {
        grace: "0s",
        ..builder
    });
    env.reload().await;
    let blue = env.blue[0].state.clone();
    assert_eq!(blue.flushes(), 0, "the reload came before the deadline");
    tokio::time::timeout(PATIENCE, blue.wait_until(|s| s.flushes() == 1))
        .await
        .expect("the deadline's Flush reaches the stub");
    // With the reloaded grace of 0s the stream would be closed now, 1012; the flip's
    // hour of grace keeps it open for a Flushed that may still come.
    let next = tokio::time::timeout(std::time::Duration::from_millis(500), ws.next()).await;
    assert!(next.is_err(), "the stream ended at once: {next:?}");
}

/// A stream two drains cover ends by the sooner of their ends (deadline plus grace): a
/// flip's drain (3 s, then an hour of grace) and the removal of its upstream by a reload
/// (4 s, no grace) end it at 4 s, when its upstream goes, not an hour later.
#[tokio::test]
async fn a_stream_under_two_drains_ends_by_the_sooner_end() {
    let builder = EnvBuilder {
        blue: 2,
        grace: "1h",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let mut ws = speak_that_never_flushes(&env).await;
    let on = usize::from(env.blue[1].state.ws_open_now() == 1);
    env.flip_draining("green", "3s").await;
    let removal = EnvBuilder {
        drain_timeout: "4s",
        grace: "0s",
        ..builder
    };
    let kept = format!("\"{}\"", env.blue[1 - on].url());
    env.write_config(&removal, &kept, &format!("\"{}\"", env.green[0].url()));
    env.reload().await;
    assert_eq!(
        env.blue[on].state.flushes(),
        0,
        "the reload came before the flip's deadline"
    );
    // The flip's deadline sends Flush; the removal's end, a second later, closes it.
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("the stream ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("closed by the removal's end, not after the flip's hour of grace");
    assert_eq!(end, Some(1012));
    assert_eq!(env.blue[on].state.flushes(), 1);
}

/// Health checks turned off by a reload and on again by another: the first probe after
/// that decides at once, as for a new upstream, so a node that went Critical meanwhile
/// stops taking traffic at once instead of after `fall` more probes (an hour here).
#[tokio::test]
async fn health_checks_back_on_decide_at_the_first_probe() {
    let checked = |interval: &'static str| EnvBuilder {
        health: if interval == "off" {
            "mode = \"off\""
        } else if interval == "1h" {
            "mode = \"deepgram\"\ninterval = \"1h\"\ntimeout = \"1s\"\nrise = 1\nfall = 3"
        } else {
            "mode = \"deepgram\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 3"
        },
        ..Default::default()
    };
    let env = checked("200ms").start().await;
    eventually(|| async { green_upstream(&env).await["health"] == "Healthy" }).await;
    env.write_config_of_first_stubs(&checked("off"));
    env.reload().await;
    eventually(|| async { green_upstream(&env).await["health"] == "not_checked" }).await;
    env.green[0].state.set_health("Critical");
    env.write_config_of_first_stubs(&checked("1h"));
    let body = env.reload().await;
    // Judged before the reload answers, as an added upstream is: a flip right after it
    // meets the verdict, not a presumption.
    let green = &body["colors"]["green"]["upstreams"][0];
    assert_eq!(green["health"], "Critical", "{green}");
    assert_eq!(green["healthy"], false, "{green}");
}

/// Green's first upstream in `/status`.
async fn green_upstream(env: &Env) -> serde_json::Value {
    env.admin_get("/status").await.1["colors"]["green"]["upstreams"][0].clone()
}

/// A `/v1/speak` stream whose stub never answers `Flush`, past its opening `Metadata`.
async fn speak_that_never_flushes(
    env: &Env,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = env.ws_url("/v1/speak?model=aura-2-thalia-en&stub_ignore_flush=1");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("handshake");
    let metadata = tokio::time::timeout(PATIENCE, ws.next()).await;
    assert!(
        matches!(&metadata, Ok(Some(Ok(Message::Text(t)))) if t.contains("Metadata")),
        "{metadata:?}"
    );
    ws
}

/// A drain already in its grace follows later changes: a reload that removes the
/// stream's upstream (no timeout, no grace) ends it at once, not after the flip's hour of
/// grace.
#[tokio::test]
async fn a_drain_in_its_grace_follows_later_changes() {
    let builder = EnvBuilder {
        blue: 2,
        grace: "1h",
        ..Default::default()
    };
    let env = builder.clone().start().await;
    let mut ws = speak_that_never_flushes(&env).await;
    let on = usize::from(env.blue[1].state.ws_open_now() == 1);
    env.flip_draining("green", "0s").await;
    tokio::time::timeout(
        PATIENCE,
        env.blue[on].state.wait_until(|s| s.flushes() == 1),
    )
    .await
    .expect("the flip's deadline sends Flush");
    // Removing the stream's upstream, with nothing to wait for, ends its grace.
    let removal = EnvBuilder {
        drain_timeout: "0s",
        grace: "0s",
        ..builder.clone()
    };
    let kept = format!("\"{}\"", env.blue[1 - on].url());
    env.write_config(&removal, &kept, &format!("\"{}\"", env.green[0].url()));
    env.reload().await;
    let end = tokio::time::timeout(PATIENCE, close_code_of(&mut ws))
        .await
        .expect("the removal ends the grace, not the flip's hour");
    assert_eq!(end, Some(1012));
}

/// Nothing moves a drain in its grace later: after a rollback and a new flip with an
/// hour's drain_timeout, the stream still ends at the end its close started with (its
/// client's audio is no longer passed on, and only its 1012 lets it reconnect).
#[tokio::test]
async fn a_new_flip_does_not_move_a_drain_in_its_grace_later() {
    let env = EnvBuilder {
        grace: "3s",
        ..Default::default()
    }
    .start()
    .await;
    let mut ws = speak_that_never_flushes(&env).await;
    env.flip_draining("green", "0s").await;
    tokio::time::timeout(PATIENCE, env.blue[0].state.wait_until(|s| s.flushes() == 1))
        .await
        .expect("the flip's deadline sends Flush");
    let (status, body) = env.admin_post("/rollback", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    env.flip_draining("green", "1h").await;
    let end = tokio::time::timeout(PATIENCE, close_code_of(&mut ws))
        .await
        .expect("the first flip's grace ends the stream, not the second flip's hour");
    assert_eq!(end, Some(1012));
}

/// The close code a stream ends with, after whatever messages come before it.
async fn close_code_of(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<u16> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("the stream ended without a close frame: {other:?}"),
        }
    }
}

/// Health checks turned on by a reload: until a probe has answered, an upstream they
/// have not judged is not counted healthy by the flip's gate (it was `not_checked`, and
/// presumed healthy, while checks were off).
#[tokio::test]
async fn checks_turned_on_gate_a_flip_until_a_probe_answers() {
    let off = EnvBuilder {
        health: "mode = \"off\"",
        ..Default::default()
    };
    let env = off.clone().start().await;
    let blue = format!("\"{}\"", env.blue[0].url());
    let (hung, task) = support::hung_upstream().await;
    let green = format!("\"http://{hung}\"");
    env.write_config(&off, &blue, &green);
    env.reload().await;
    let on = EnvBuilder {
        health: "mode = \"deepgram\"\ninterval = \"200ms\"\ntimeout = \"1h\"\nrise = 1\nfall = 1",
        ..Default::default()
    };
    env.write_config(&on, &blue, &green);
    env.reload().await;
    let (status, body) = env
        .admin_post("/flip", Some(serde_json::json!({ "to": "green" })))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "target_unhealthy");
    task.abort();
}
