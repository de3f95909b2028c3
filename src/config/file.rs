//! The serde mirror of the TOML file: names and shapes exactly as an operator writes them.
//!
//! Nothing here is validated beyond what serde does; `Config::try_from` in the parent turns
//! this into typed values and names the field when something is wrong.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<Listen>,
    pub tls: Option<Tls>,
    pub pools: Option<Pools>,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub drain: Drain,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub admin: Admin,
    pub client_auth: Option<ClientAuth>,
    #[serde(default)]
    pub limits: Limits,
    pub upstream_tls: Option<UpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub proxy: Option<String>,
    pub preview: Option<String>,
    pub admin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pools {
    pub blue: Option<Vec<String>>,
    pub green: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub initial: String,
    pub state_file: String,
    pub store: String,
    pub etcd: Option<Etcd>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            initial: "blue".into(),
            state_file: "state/route.json".into(),
            store: "file".into(),
            etcd: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    pub endpoints: Vec<String>,
    pub key: String,
    pub replica_id: Option<String>,
    #[serde(default = "default_lease_ttl", with = "crate::duration::serde")]
    pub lease_ttl: Duration,
    #[serde(default = "default_etcd_timeout", with = "crate::duration::serde")]
    pub timeout: Duration,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_etcd_timeout() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drain {
    #[serde(with = "crate::duration::serde")]
    pub timeout: Duration,
    #[serde(with = "crate::duration::serde")]
    pub grace: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub mode: String,
    pub path: String,
    #[serde(with = "crate::duration::serde")]
    pub interval: Duration,
    #[serde(with = "crate::duration::serde")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            mode: "deepgram".into(),
            path: "/v1/status".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub token_file: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            token_file: "config/admin.token".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    pub keys_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    #[serde(with = "crate::duration::serde")]
    pub connect_timeout: Duration,
    #[serde(with = "crate::duration::serde")]
    pub response_timeout: Duration,
    #[serde(with = "crate::duration::serde")]
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    #[serde(with = "crate::duration::serde")]
    pub stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(15 * 60),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            stall_timeout: Duration::from_secs(5 * 60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca_file: Option<String>,
}
