//! One throwaway PostgreSQL cluster per test.
//!
//! [`PgCluster::start`] makes a private cluster in a fresh temporary directory and starts it
//! listening **only on a Unix socket in that directory** (`listen_addresses=''`), so no port is
//! taken, nothing is shared with other tests or with a PostgreSQL service the machine may run,
//! and a busy port 5432 does not matter. The server runs with its defaults for durability
//! (`fsync=on`, `synchronous_commit=on`): tests that restart or crash it see real recovery.
//!
//! PostgreSQL refuses to run as root, so when the test runs as root the server binaries run as
//! the unprivileged `postgres` user (`setpriv --reuid=postgres --regid=postgres
//! --clear-groups`; Debian's `postgresql` package creates that user) and the directory is
//! handed to it; otherwise they run as the test's own user.
//!
//! `initdb` costs seconds (it writes and syncs a whole cluster), so it runs once per machine
//! and PostgreSQL version into a template (`$TMPDIR/xvtpm-pg-template-<version>-<uid>`, made
//! in a scratch directory and renamed into place when complete, so a concurrent or
//! interrupted `initdb` never leaves a half template); each cluster is a copy of it.
//!
//! The binaries are found in `$XVTPM_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's layout). When they are missing the test fails with a message naming the package.
//!
//! Logs are kept like swtpm's: the server log is in the cluster directory; a panicking test
//! prints its tail and keeps the directory (`XVTPM_KEEP_TEST_DIRS=1` keeps it always). The
//! server is stopped by its postmaster's PID file (`pg_ctl stop -m immediate`) on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT_SECS: u32 = 60;
const PANIC_LOG_LINES: usize = 80;

/// A private PostgreSQL cluster, stopped and removed on drop.
pub struct PgCluster {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgCluster({})", self.dir().display())
    }
}

/// Where the PostgreSQL server binaries are; panics naming the package when they are absent.
pub fn pg_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XVTPM_PG_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.join("initdb").exists(),
            "XVTPM_PG_BIN={} has no initdb; point it at PostgreSQL's bin directory",
            p.display()
        );
        return p;
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb): these \
             tests run a real PostgreSQL server. Install the Debian package `postgresql` \
             (`apt-get install postgresql`, or scripts/install-deps.sh), or set XVTPM_PG_BIN to \
             the directory holding initdb, pg_ctl and postgres"
        ),
    }
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command running PostgreSQL binary `name` as the server's user.
fn pg_cmd(bin: &Path, name: &str) -> Command {
    if as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
            .arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    }
}

/// Hands `path` (recursively) to the server's user when running as root.
fn give_to_server_user(path: &Path) {
    if !as_root() {
        return;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("read the user database")
        .unwrap_or_else(|| {
            panic!(
                "there is no `postgres` user to run PostgreSQL as (it refuses root); the Debian \
                 package `postgresql` creates it (`apt-get install postgresql`)"
            )
        });
    let out = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", user.uid, user.gid))
        .arg(path)
        .output()
        .expect("run chown");
    assert!(out.status.success(), "chown {}: {out:?}", path.display());
}

fn run(mut c: Command, what: &str) -> String {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The template data directory for this PostgreSQL version, made on first use.
fn template(bin: &Path) -> PathBuf {
    let mut c = pg_cmd(bin, "postgres");
    c.arg("--version");
    let version = run(c, "postgres --version");
    let version: String = version
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let uid = nix::unistd::geteuid();
    let root = std::env::temp_dir();
    let path = root.join(format!("xvtpm-pg-template-{version}-{uid}"));
    if path.join("data").join("PG_VERSION").exists() {
        return path;
    }
    let scratch = tempfile::Builder::new()
        .prefix("xvtpm-pg-initdb-")
        .tempdir_in(&root)
        .expect("scratch directory for initdb");
    give_to_server_user(scratch.path());
    let mut c = pg_cmd(bin, "initdb");
    c.arg("-D")
        .arg(scratch.path().join("data"))
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
        .arg("--no-instructions");
    run(c, "initdb");
    let scratch = scratch.keep();
    if std::fs::rename(&scratch, &path).is_err() {
        // Another test made it meanwhile.
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(
        path.join("data").join("PG_VERSION").exists(),
        "PostgreSQL template {} is incomplete; remove it",
        path.display()
    );
    path
}

impl PgCluster {
    /// Makes and starts a private cluster (a copy of the template) on a Unix socket in its own
    /// directory. The superuser is `postgres`, trusted on that socket; database `postgres` exists.
    pub fn start() -> PgCluster {
        let bin = pg_bin();
        let template = template(&bin);
        let dir = tempfile::Builder::new()
            .prefix("xvtpm-pg-")
            .tempdir()
            .expect("cluster directory");
        let out = Command::new("cp")
            .arg("-a")
            .arg(template.join("data"))
            .arg(dir.path().join("data"))
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "copy the PostgreSQL template: {out:?}"
        );
        give_to_server_user(dir.path());
        let c = PgCluster {
            dir: Some(dir),
            bin,
        };
        c.pg_ctl_start();
        c
    }

    /// The cluster's directory (data in `data/`, socket, `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("cluster directory").path()
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir()
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("server.log")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A `postgres://` URL for database `db` over the Unix socket (the socket directory
    /// percent-encoded as the host).
    pub fn url(&self, db: &str) -> String {
        let host: String = self
            .socket_dir()
            .to_str()
            .expect("UTF-8 path")
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("postgres://postgres@{host}/{db}")
    }

    /// The same in libpq's key-value form (`host=/dir user=postgres dbname=db`).
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} user=postgres dbname={db}",
            self.socket_dir().display()
        )
    }

    /// Creates database `name` (owned by `postgres`).
    pub fn create_db(&self, name: &str) {
        let mut c = pg_cmd(&self.bin, "createdb");
        c.arg("-h")
            .arg(self.socket_dir())
            .args(["-U", "postgres", name]);
        run(c, "createdb");
    }

    /// The postmaster's PID (first line of `postmaster.pid`), if it runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// `pg_ctl start` with this cluster's options (Unix socket only, fsync on), waiting up to
    /// `timeout_secs` for the server to accept connections.
    fn pg_ctl_start_cmd(&self, timeout_secs: u32) -> Command {
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=on \
             -c synchronous_commit=on -c max_connections=50",
            self.socket_dir().display()
        );
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir().join("data"))
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", &timeout_secs.to_string(), "-o", &opts, "start"])
            .stdin(Stdio::null());
        c
    }

    fn pg_ctl_start(&self) {
        let out = self
            .pg_ctl_start_cmd(START_TIMEOUT_SECS)
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}): {}\n--- server log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(PANIC_LOG_LINES)
        );
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir().join("data"))
            .args(["-w", "-t", "60", "-m", mode, "stop"]);
        run(c, &format!("pg_ctl stop -m {mode}"));
    }

    /// `pg_ctl restart -m fast`: clients are disconnected, the server shuts down cleanly and
    /// starts again.
    pub fn restart_fast(&self) {
        self.pg_ctl_stop("fast");
        self.pg_ctl_start();
    }

    /// A crash: `pg_ctl stop -m immediate` (every server process is killed, no checkpoint),
    /// then a start, which replays the WAL.
    pub fn crash_restart(&self) {
        self.pg_ctl_stop("immediate");
        self.pg_ctl_start();
    }

    /// SIGKILL of the postmaster; its backends notice and exit; then a start (crash recovery).
    pub fn kill9_restart(&self) {
        let pid = self.postmaster_pid().expect("postmaster runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill postmaster");
        // The orphaned backends keep the shared memory until they notice; the new postmaster
        // refuses to start while they hold it, so retry for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pid_alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if !pid_alive
                && self
                    .pg_ctl_start_cmd(10)
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not come back after kill -9 of its postmaster:\n{}",
                self.log_tail(PANIC_LOG_LINES)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let keep = std::env::var_os("XVTPM_KEEP_TEST_DIRS").is_some_and(|v| v != "0");
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL server log ({}), last {PANIC_LOG_LINES} lines ---\n{}",
                self.log_path().display(),
                self.log_tail(PANIC_LOG_LINES)
            );
        }
        if self.postmaster_pid().is_some() {
            let mut c = pg_cmd(&self.bin, "pg_ctl");
            c.arg("-D").arg(self.dir().join("data")).args([
                "-w",
                "-t",
                "30",
                "-m",
                "immediate",
                "stop",
            ]);
            let _ = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if keep || std::thread::panicking() {
            let dir = self.dir.take().expect("cluster directory").keep();
            eprintln!("PostgreSQL cluster kept in {}", dir.display());
        }
    }
}
