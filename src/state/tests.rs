//! Unit tests of the route state: the file round trip, `changed_at`, the history's bounds,
//! and states refused when read.

use super::*;

#[test]
fn round_trip_and_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStore::new(dir.path().join("sub/route.json"));
    assert!(store.load().expect("missing is fine").is_none());
    let s1 = RouteState::first_start(Color::Blue, SystemTime::now());
    let s2 = s1.next(
        Action::Flip,
        Color::Green,
        Some(Color::Blue),
        SystemTime::now(),
        Some("deploy".into()),
    );
    store.save(&s2).expect("save");
    let back = store.load().expect("load").expect("present");
    assert_eq!(back, s2);
    assert_eq!(back.generation, 2);
    assert_eq!(back.history.len(), 2);
    assert_eq!(back.history[1].from, Some(Color::Blue));
}

#[test]
fn a_stored_time_at_the_end_of_year_9999_does_not_panic_the_next_change() {
    let mut state = RouteState::first_start(Color::Blue, SystemTime::now());
    state.changed_at = "9999-12-31T23:59:59.999Z".into();
    let next = state.next(Action::Commit, Color::Blue, None, SystemTime::now(), None);
    assert_eq!(next.changed_at, "9999-12-31T23:59:59.999Z");
}

#[test]
fn changed_at_moves_with_every_generation() {
    let at = SystemTime::now();
    let mut state = RouteState::first_start(Color::Blue, at);
    let mut seen = vec![state.changed_at.clone()];
    // Three changes in the same instant, then one from a clock that stepped back.
    for at in [at, at, at, at - Duration::from_secs(60)] {
        state = state.next(Action::Flip, Color::Green, Some(Color::Blue), at, None);
        assert_eq!(state.history.last().map(|h| &h.at), Some(&state.changed_at));
        seen.push(state.changed_at.clone());
    }
    let times: Vec<SystemTime> = seen
        .iter()
        .map(|t| humantime::parse_rfc3339(t).expect("RFC 3339"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[test]
fn long_reasons_cannot_grow_the_history_past_its_bytes() {
    // A control character takes six bytes in JSON.
    let reason = "\u{1}".repeat(crate::control::MAX_REASON);
    let mut state = RouteState::first_start(Color::Blue, SystemTime::UNIX_EPOCH);
    for i in 0..120 {
        let to = if i % 2 == 0 {
            Color::Green
        } else {
            Color::Blue
        };
        state = state.next(
            Action::Flip,
            to,
            None,
            SystemTime::now(),
            Some(reason.clone()),
        );
    }
    let json = serde_json::to_vec(&state.history).expect("json");
    assert!(json.len() <= HISTORY_BYTES, "{} bytes", json.len());
    assert!(state.history.len() < 120, "{} entries", state.history.len());
    let last = state.history.last().expect("the newest stays");
    assert_eq!(last.generation, state.generation);
    // Short reasons keep the full count.
    let mut state = RouteState::first_start(Color::Blue, SystemTime::UNIX_EPOCH);
    for _ in 0..HISTORY_LIMIT {
        state = state.next(Action::Commit, state.active, None, SystemTime::now(), None);
    }
    assert_eq!(state.history.len(), HISTORY_LIMIT);
}

#[test]
fn a_generation_beyond_what_json_holds_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.json");
    let store = FileStore::new(&path);
    let mut state = RouteState::first_start(Color::Blue, SystemTime::UNIX_EPOCH);
    state.generation = MAX_GENERATION;
    store.save(&state).expect("save");
    let loaded = store.load().expect("the largest loads").expect("a state");
    let next = loaded.next(Action::Flip, Color::Green, None, SystemTime::now(), None);
    assert_eq!(
        next.generation, MAX_GENERATION,
        "a state a restart can read"
    );
    for beyond in [MAX_GENERATION + 1, u64::MAX] {
        state.generation = beyond;
        store.save(&state).expect("save");
        let err = store.load().expect_err("refused").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(&format!("generation {beyond}")), "{err}");
    }
}

#[test]
fn a_state_that_contradicts_itself_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.json");
    let store = FileStore::new(&path);
    let state = RouteState::first_start(Color::Blue, SystemTime::UNIX_EPOCH);
    let flipped = state.next(Action::Flip, Color::Green, None, SystemTime::now(), None);
    store.save(&flipped).expect("save");
    assert_eq!(store.load().expect("valid").as_ref(), Some(&flipped));
    let mut to_itself = flipped.clone();
    to_itself.rollback_to = Some(Color::Green);
    let mut undated = flipped.clone();
    undated.changed_at = "yesterday".into();
    for (bad, why) in [
        (to_itself, "rollback_to is the active colour, green"),
        (undated, "changed_at \"yesterday\" is not an RFC 3339"),
    ] {
        store.save(&bad).expect("save");
        let err = store.load().expect_err("refused").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn corrupt_file_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.json");
    std::fs::write(&path, "{not json").expect("write");
    let err = FileStore::new(&path).load().expect_err("corrupt");
    assert!(err.to_string().contains(&path.display().to_string()));
}
