//! Where the registry lives ([`Location`], from `--registry` / `XVTPM_REGISTRY`: a SQLite path
//! or a PostgreSQL URL or key=value conninfo, its password never shown), and this host's name
//! in it.

use std::path::PathBuf;

use super::RegistryError;


/// Where the registry lives, from `--registry` / `XVTPM_REGISTRY`.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An embedded SQLite file (a path, or `sqlite:PATH`).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by a fleet: a `postgres://` or `postgresql://` URL, or a
    /// libpq key-value string (`host=/run/postgresql dbname=xvtpm user=xvtpm`).
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// libpq keys that start a key-value connection string.
const CONNINFO_KEYS: &[&str] = &["host", "hostaddr", "port", "dbname", "user"];

impl Location {
    /// Parses a location; nothing is opened or created. A string that is neither a URL nor a
    /// key-value string is a file path.
    pub fn parse(spec: &str) -> Result<Location, RegistryError> {
        let bad = |why: &str| RegistryError::BadLocation {
            spec: redact(spec),
            why: why.to_string(),
        };
        if spec.trim().is_empty() {
            return Err(bad(
                "empty; give a file path, sqlite:PATH or postgres://USER@HOST/DB",
            ));
        }
        let lower = spec.to_ascii_lowercase();
        let kv = CONNINFO_KEYS.iter().any(|k| {
            lower
                .strip_prefix(k)
                .is_some_and(|r| r.trim_start().starts_with('='))
        });
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") || kv {
            let config: postgres::Config = spec.parse().map_err(|e| {
                bad(&format!(
                    "not a PostgreSQL connection string ({e}); write \
                     postgres://USER@HOST/DB or, for a Unix socket, \
                     postgres://USER@%2Frun%2Fpostgresql/DB"
                ))
            })?;
            if config.get_dbname().is_none() {
                return Err(bad(
                    "names no database; add it (postgres://USER@HOST/DB or dbname=DB)",
                ));
            }
            return Ok(Location::Postgres(spec.to_string()));
        }
        if lower.starts_with("postgres:") || lower.starts_with("postgresql:") {
            return Err(bad(
                "a PostgreSQL URL starts with postgres:// (for a Unix socket: \
                 postgres://USER@%2Frun%2Fpostgresql/DB)",
            ));
        }
        let path = spec.strip_prefix("sqlite:").unwrap_or(spec);
        if path.is_empty() {
            return Err(bad("sqlite: needs a file path (sqlite:/var/lib/xvtpm/registry.sqlite)"));
        }
        if spec.contains("://") {
            return Err(bad(
                "unknown scheme; the registry is a SQLite file (a path or sqlite:PATH) or \
                 PostgreSQL (postgres://…)",
            ));
        }
        Ok(Location::Sqlite(PathBuf::from(path)))
    }

    /// A printable name (never the password).
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => format!("SQLite file {}", p.display()),
            Location::Postgres(s) => match s.parse::<postgres::Config>() {
                Ok(c) => {
                    let hosts: Vec<String> = c
                        .get_hosts()
                        .iter()
                        .map(|h| match h {
                            postgres::config::Host::Tcp(h) => h.clone(),
                            postgres::config::Host::Unix(p) => p.display().to_string(),
                        })
                        .collect();
                    format!(
                        "PostgreSQL database {} on {} as {}",
                        c.get_dbname().unwrap_or("?"),
                        if hosts.is_empty() { "the default socket".into() } else { hosts.join(",") },
                        c.get_user().unwrap_or("the current user")
                    )
                }
                Err(_) => format!("PostgreSQL {}", redact(s)),
            },
        }
    }
}

/// `spec` with any password replaced by `***`.
pub(super) fn redact(spec: &str) -> String {
    let mut out = spec.to_string();
    if let Some(rest) = spec.split_once("://").map(|(_, r)| r)
        && let Some((userinfo, _)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        out = spec.replacen(userinfo, &format!("{user}:***"), 1);
    }
    let mut words: Vec<String> = out.split(' ').map(str::to_string).collect();
    for w in &mut words {
        if w.to_ascii_lowercase().starts_with("password=") {
            *w = "password=***".into();
        }
    }
    words.join(" ")
}

/// This machine's host name (the default `--host`).
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| check_host(h).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Refuses host names that cannot be recorded or printed safely.
pub fn check_host(host: &str) -> Result<(), RegistryError> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadHost(host.escape_debug().to_string()))
    }
}
