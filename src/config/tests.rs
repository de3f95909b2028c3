//! Unit tests of `Config::parse`: defaults, refusals that name their field, listener
//! clashes, etcd settings, and what a reload may change.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

const MINIMAL: &str = r#"
[listen]
proxy = "127.0.0.1:8080"
admin = "127.0.0.1:9901"
[pools]
blue = ["http://127.0.0.1:9001"]
green = ["http://127.0.0.1:9002"]
"#;

/// Every default SPEC.md's config block shows.
#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).expect("valid");
    let secs = Duration::from_secs;
    assert_eq!(c.listen.preview, None);
    assert!(c.tls.is_none());
    assert_eq!(c.routing.initial, Color::Blue);
    assert_eq!(c.routing.state_file, Path::new("state/route.json"));
    assert_eq!(c.routing.store, Store::File);
    assert_eq!(c.drain.timeout, secs(1800));
    assert_eq!(c.drain.grace, secs(10));
    assert_eq!(c.health.mode, HealthMode::Deepgram);
    assert_eq!(c.health.path.as_str(), "/v1/status");
    assert_eq!(c.health.interval, secs(2));
    assert_eq!(c.health.timeout, secs(1));
    assert_eq!((c.health.rise, c.health.fall), (2, 3));
    assert_eq!(c.admin.token_file, Path::new("config/admin.token"));
    assert!(c.client_auth.is_none());
    assert_eq!(c.limits.connect_timeout, secs(3));
    assert_eq!(c.limits.response_timeout, secs(15 * 60));
    assert_eq!(c.limits.header_read_timeout, secs(10));
    assert_eq!(c.limits.max_connections, 20_000);
    assert_eq!(c.limits.stall_timeout, secs(300));
    assert_eq!(c.upstream_tls.ca_file, None);
}

#[test]
fn a_zero_stall_timeout_is_refused() {
    let e = parse(&format!("{MINIMAL}\n[limits]\nstall_timeout = \"0s\"\n")).expect_err("zero");
    assert_eq!(e.field, "limits.stall_timeout", "{e}");
    let c = parse(&format!("{MINIMAL}\n[limits]\nstall_timeout = \"90s\"\n")).expect("valid");
    assert_eq!(c.limits.stall_timeout, Duration::from_secs(90));
}

#[test]
fn a_timeout_past_ten_years_is_refused() {
    // hyper adds `header_read_timeout` to the clock, and a shutdown adds `drain.timeout`
    // and `drain.grace`: both panic past what the clock can hold.
    for (table, key) in [
        ("limits", "header_read_timeout"),
        ("limits", "stall_timeout"),
        ("health", "interval"),
        ("drain", "timeout"),
        ("drain", "grace"),
    ] {
        let text = format!("{MINIMAL}\n[{table}]\n{key} = \"300000000000y\"\n");
        let e = parse(&text).expect_err("absurd");
        assert_eq!(e.field, format!("{table}.{key}"), "{e}");
        assert!(e.to_string().contains("at most 10 years"), "{e}");
    }
    let c = parse(&format!("{MINIMAL}\n[limits]\nstall_timeout = \"10y\"\n")).expect("valid");
    assert!(c.limits.stall_timeout > Duration::from_secs(3600));
}

/// humantime panics on a total of `u64::MAX` seconds with a carry of nanoseconds; such a
/// value is refused like any other too long.
#[test]
fn a_duration_that_would_overflow_is_refused_not_a_panic() {
    for value in [
        "18446744073709551615s 1000ms",
        "18446744073709551615s 1000000000ns",
    ] {
        let text = format!("{MINIMAL}\n[drain]\ntimeout = \"{value}\"\n");
        let e = parse(&text).expect_err("absurd");
        assert_eq!(e.field, "drain.timeout", "{e}");
        assert!(e.reason.contains("too long"), "{e}");
    }
}

/// An error names the field, line and column, but repeats no value that may be secret:
/// not toml's source excerpt, not a URL's password.
#[test]
fn errors_do_not_repeat_the_config_line_or_a_password() {
    let text = format!("{MINIMAL}\n[admin]\ntoken_file = s3cr3t\n");
    let e = parse(&text).expect_err("unquoted");
    assert!(e.reason.contains("line 10, column 14"), "{e}");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");

    // Passwords with characters a URL reserves (unencoded) too.
    for password in [
        "hunter2",
        "hun#ter2",
        "hun/ter2",
        "hun?ter2",
        "hun'ter2",
        "hun ter2",
        "hun`ter2",
        "hun\\\"ter2",
    ] {
        let text = MINIMAL.replace(
            "http://127.0.0.1:9001",
            &format!("http://admin:{password}@127.0.0.1:9001"),
        );
        let e = parse(&text).expect_err("credentials");
        assert_eq!(e.field, "pools.blue[0]", "{e}");
        assert!(e.reason.contains("http://…@127.0.0.1:9001"), "{e}");
        assert!(!e.to_string().contains("ter2"), "{e}");
        // A string where a list belongs is quoted by the parser: without the password.
        let text = MINIMAL.replace(
            "[\"http://127.0.0.1:9001\"]",
            &format!("\"http://admin:{password}@127.0.0.1:9001\""),
        );
        let e = parse(&text).expect_err("not a list");
        assert!(!e.to_string().contains("ter2"), "{e}");
    }
    for endpoint in [
        "http://root:p#ss@127.0.0.1:2379",
        "root:pa/ss@127.0.0.1:2379",
        "http://root:it'ss@127.0.0.1:2379",
        "root:pa/ss@127.0.0.1:2379/x://y",
    ] {
        let text = format!(
            "{MINIMAL}\n[routing]\nstore = \"etcd\"\netcd = {{ endpoints = [\"{endpoint}\"], key = \"/k\" }}\n"
        );
        let e = parse(&text).expect_err("credentials");
        assert!(!e.to_string().contains("ss@"), "{e}");
        assert!(e.reason.contains("…@127.0.0.1:2379"), "{e}");
        // Written as a string where a list belongs: toml's quote of it, without it.
        let text = format!(
            "{MINIMAL}\n[routing]\nstore = \"etcd\"\netcd = {{ endpoints = \"{endpoint}\", key = \"/k\" }}\n"
        );
        let e = parse(&text).expect_err("not a list");
        assert!(!e.to_string().contains("ss@"), "{e}");
    }
}

#[test]
fn unknown_key_is_named() {
    let e = parse(&format!("{MINIMAL}\n[limits]\nmax_conns = 3\n")).expect_err("unknown key");
    assert_eq!(e.file, "test.toml");
    assert!(e.reason.contains("max_conns"), "{e}");
    assert!(e.field.contains("limits"), "{e}");
}

#[test]
fn zero_drain_timeout_is_valid() {
    let c = parse(&format!("{MINIMAL}\n[drain]\ntimeout = \"0s\"\n")).expect("valid");
    assert!(c.drain.timeout.is_zero());
}

#[test]
fn listeners_clash_on_one_port_when_an_address_covers_the_other() {
    let a = |s: &str| s.parse::<SocketAddr>().expect("address");
    assert!(clash(a("127.0.0.1:80"), a("127.0.0.1:80")));
    assert!(clash(a("0.0.0.0:80"), a("127.0.0.1:80")));
    assert!(clash(a("127.0.0.2:80"), a("0.0.0.0:80")));
    assert!(clash(a("[::]:80"), a("0.0.0.0:80")));
    assert!(clash(a("[::1]:80"), a("[::]:80")));
    assert!(!clash(a("127.0.0.1:80"), a("127.0.0.2:80")));
    assert!(!clash(a("127.0.0.1:80"), a("127.0.0.1:81")));
    assert!(!clash(a("0.0.0.0:80"), a("[::1]:80")));
    assert!(!clash(a("0.0.0.0:0"), a("0.0.0.0:0")));

    let text = MINIMAL.replace("admin = \"127.0.0.1:9901\"", "admin = \"0.0.0.0:8080\"");
    let e = parse(&text).expect_err("clash");
    assert_eq!(e.field, "listen.admin", "{e}");
}

/// A bad etcd endpoint or an empty replica id is named by `check`, in every build: before,
/// `run` failed later without naming the field, or stayed out of sync for good.
#[test]
fn etcd_endpoints_and_replica_id_are_checked() {
    let with = |endpoint: &str, extra: &str| {
        parse(&format!(
            "{MINIMAL}\n[routing]\nstore = \"etcd\"\netcd = {{ endpoints = [\"{endpoint}\"], key = \"/k\"{extra} }}\n"
        ))
    };
    for bad in [
        "not a url",
        "ftp://127.0.0.1:2379",
        "https://127.0.0.1:2379",
        "http://",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "127.0.0.1",
        "http://127.0.0.1",
        "http://127.0.0.1:2379/v3",
        "http://user:secret@127.0.0.1:2379",
    ] {
        let e = with(bad, "").expect_err(bad);
        assert_eq!(e.field, "routing.etcd.endpoints", "{bad}: {e}");
        if bad.contains('@') {
            // Named without its password.
            assert!(e.reason.contains("…@127.0.0.1:2379"), "{bad}: {e}");
            assert!(!e.reason.contains("secret"), "{bad}: {e}");
        } else {
            assert!(e.reason.contains(bad), "{bad}: {e}");
        }
    }
    let e = with("http://127.0.0.1:2379", ", replica_id = \" \"").expect_err("empty id");
    assert_eq!(e.field, "routing.etcd.replica_id", "{e}");
    // Good endpoints get past these checks (to the feature check in a build without it).
    for good in [
        "http://127.0.0.1:2379",
        "http://etcd.internal:2379/",
        "127.0.0.1:2379",
    ] {
        if let Err(e) = with(good, ", replica_id = \"proxy-a\"") {
            assert_eq!(e.field, "routing.store", "{good}: {e}");
        }
    }
}

#[test]
fn a_reload_may_change_all_but_the_listeners_tls_on_or_off_and_the_state_file() {
    let old = parse(MINIMAL).expect("valid");
    let conflict = |text: String| old.reload_conflict(&parse(&text).expect("valid"));
    let may = format!(
        "{MINIMAL}\n[drain]\ntimeout = \"1m\"\n[health]\ninterval = \"5s\"\n[limits]\nmax_connections = 10\n"
    )
    .replace("http://127.0.0.1:9002", "http://127.0.0.1:9003");
    assert!(conflict(may).is_none());
    let moved = |from: &str, to: &str| {
        assert!(MINIMAL.contains(from));
        MINIMAL.replace(from, to)
    };
    for (text, field) in [
        (moved("127.0.0.1:8080", "127.0.0.1:8081"), "listen.proxy"),
        (moved("127.0.0.1:9901", "127.0.0.1:9902"), "listen.admin"),
        (
            moved("[pools]", "preview = \"127.0.0.1:8082\"\n[pools]"),
            "listen.preview",
        ),
        (
            format!("{MINIMAL}\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"),
            "tls",
        ),
        (
            format!("{MINIMAL}\n[routing]\nstate_file = \"elsewhere.json\"\n"),
            "routing.state_file",
        ),
    ] {
        let e = conflict(text).expect("refused");
        assert_eq!(e.field, field, "{e}");
        assert!(e.reason.contains("restart"), "{e}");
    }
}

/// A reload that changes one etcd setting is refused naming that setting, not the store.
#[test]
fn a_reload_changing_an_etcd_setting_names_it() {
    let with_store = |etcd: EtcdStore| {
        let mut config = parse(MINIMAL).expect("valid");
        config.routing.store = Store::Etcd(etcd);
        config
    };
    let etcd = EtcdStore {
        endpoints: vec!["http://127.0.0.1:2379".into()],
        key: "/switchyard/route".into(),
        replica_id: Some("proxy-a".into()),
        lease_ttl: Duration::from_secs(10),
        timeout: Duration::from_secs(2),
    };
    let old = with_store(etcd.clone());
    assert!(old.reload_conflict(&with_store(etcd.clone())).is_none());
    type Edit = fn(&mut EtcdStore);
    let changes: [(Edit, &str); 5] = [
        (
            |e| e.endpoints.push("http://127.0.0.2:2379".into()),
            "routing.etcd.endpoints",
        ),
        (|e| e.key = "/other".into(), "routing.etcd.key"),
        (|e| e.replica_id = None, "routing.etcd.replica_id"),
        (
            |e| e.lease_ttl = Duration::from_secs(5),
            "routing.etcd.lease_ttl",
        ),
        (
            |e| e.timeout = Duration::from_secs(1),
            "routing.etcd.timeout",
        ),
    ];
    for (change, field) in changes {
        let mut changed = etcd.clone();
        change(&mut changed);
        let e = old.reload_conflict(&with_store(changed)).expect(field);
        assert_eq!(e.field, field, "{e}");
    }
    let e = old
        .reload_conflict(&parse(MINIMAL).expect("valid"))
        .expect("etcd to file");
    assert_eq!(e.field, "routing.store", "{e}");
}

/// A pool URL's port is a port: `http` would read one it cannot hold as none, and the
/// upstream would be port 80.
#[test]
fn a_pool_url_with_an_impossible_port_is_refused() {
    for bad in [
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://127.0.0.1:",
        "http://127.0.0.1:+80",
        "https://[::1]:70000",
    ] {
        let e = parse(&MINIMAL.replace("http://127.0.0.1:9002", bad)).expect_err(bad);
        assert_eq!(e.field, "pools.green[0]", "{bad}: {e}");
        assert!(e.reason.contains("from 1 to 65535"), "{bad}: {e}");
    }
    for (good, port) in [
        ("http://127.0.0.1:65535", 65535),
        ("https://[::1]:8443", 8443),
        ("http://localhost", 80),
        ("https://localhost", 443),
    ] {
        let config = parse(&MINIMAL.replace("http://127.0.0.1:9002", good)).expect(good);
        assert_eq!(config.pools.green[0].port(), port, "{good}");
    }
}
