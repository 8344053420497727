//! Only root and a vTPM's declared consumer reach its data and control channels:
//! by default on Unix sockets in a 0700 directory owned by the consumer (checked
//! again with SO_PEERCRED), and on loopback TCP only on request, where each
//! connection is mapped to the uid that made it. Real uids, real connections.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use xvtpm_tests::{Stack, get_random, raw_command, rc};

/// `nobody`: the consumer in these tests.
const NOBODY: u32 = 65534;
/// Another local user (no passwd entry needed to be one).
const OTHER: u32 = 4242;

/// Connects `repeat` times as the calling uid, sends `payload` and reads `n` bytes.
/// Prints `REPLY <hex>` (the last full reply), `CLOSED` (EOF before `n` bytes) or
/// `ERR <errno>`, then the tally of every outcome.
const PROBE: &str = r#"
import socket, sys, collections
kind, addr, payload, n, repeat = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tally, last = collections.Counter(), ""
for _ in range(repeat):
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(addr)
        else:
            h, p = addr.rsplit(":", 1)
            s = socket.create_connection((h, int(p)), timeout=10)
        s.sendall(payload)
        got = b""
        while len(got) < n:
            c = s.recv(n - len(got))
            if not c:
                break
            got += c
        s.close()
        last = ("REPLY " + got.hex()) if len(got) == n else "CLOSED"
        tally[last.split()[0]] += 1
    except OSError as e:
        last = "ERR %d" % e.errno
        tally[last] += 1
print(last)
print(dict(tally))
"#;

/// Runs [`PROBE`] as `uid`; returns its first line.
fn probe_as(uid: u32, kind: &str, addr: &str, payload: &[u8], n: usize, repeat: u32) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(PROBE)
        .args([kind, addr, &hex::encode(payload), &n.to_string(), &repeat.to_string()])
        .uid(uid)
        .gid(uid)
        .current_dir("/")
        .output()
        .expect("run python3");
    assert!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string()
}

/// `GetRandom(8)` over the data channel: served (rc 0) or not.
fn data_served(uid: u32, kind: &str, addr: &str) -> bool {
    // Tag 0x8001, size 20, rc 0.
    probe_as(uid, kind, addr, &get_random(8), 20, 1).starts_with("REPLY 80010000001400000000")
}

/// `CMD_GET_CAPABILITY` over the control channel: answered or not.
fn ctrl_served(uid: u32, kind: &str, addr: &str) -> bool {
    probe_as(uid, kind, addr, &1u32.to_be_bytes(), 8, 1).starts_with("REPLY ")
}

fn mode(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.mode() & 0o7777)
}

/// Lets other uids traverse the test's private temporary directory, as `/run` allows.
fn open_tempdir(s: &Stack) {
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
}

#[test]
fn default_unix_sockets_serve_only_root_and_the_consumer() {
    let s = Stack::start();
    open_tempdir(&s);
    let v = s.create_vtpm_with(&["--consumer", "nobody"]);
    let data = v.socket.clone().expect("default listeners are Unix sockets");
    let ctrl = format!("{}.ctrl", data.display());
    let (d, c) = (data.to_str().unwrap(), ctrl.as_str());
    assert_eq!(v.tcti(), format!("swtpm:path={d}"));
    assert!(v.port.is_none(), "no TCP listener unless asked for");

    // Layout: a root-owned parent nobody else writes, a 0700 directory of the consumer,
    // 0600 sockets of the consumer.
    let dir = data.parent().unwrap();
    let (uid, m) = mode(dir.parent().unwrap());
    assert!(uid == 0 && m & 0o022 == 0, "parent uid {uid} mode {m:o}");
    assert_eq!(mode(dir), (NOBODY, 0o700));
    assert_eq!(mode(&data), (NOBODY, 0o600));
    assert_eq!(mode(Path::new(c)), (NOBODY, 0o600));

    // Root and the consumer are served on both channels; another user cannot even connect.
    xvtpm_tests::tpm2(&v.tcti(), &["tpm2_getrandom", "--hex", "8"]);
    assert!(data_served(0, "unix", d) && ctrl_served(0, "unix", c));
    assert!(data_served(NOBODY, "unix", d), "the consumer is refused its data channel");
    assert!(ctrl_served(NOBODY, "unix", c), "the consumer is refused its control channel");
    assert_eq!(probe_as(OTHER, "unix", d, &get_random(8), 20, 1), "ERR 13");
    assert_eq!(probe_as(OTHER, "unix", c, &1u32.to_be_bytes(), 8, 1), "ERR 13");

    // Belt and braces: with the file-system barrier gone (an admin's chmod), the vTPM
    // itself still refuses the other user (SO_PEERCRED), and says so, rate-limited.
    for (p, m) in [(dir, 0o777), (data.as_path(), 0o666), (Path::new(c), 0o666)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    assert!(!data_served(OTHER, "unix", d), "another uid was served on the data channel");
    assert!(!ctrl_served(OTHER, "unix", c), "another uid was served on the control channel");
    // CMD_INIT from another uid would power-cycle the vTPM (PCRs reset): refused, 300 times.
    let init = [0, 0, 0, 2, 0, 0, 0, 0];
    assert!(!probe_as(OTHER, "unix", c, &init, 4, 300).starts_with("REPLY"));
    assert!(data_served(NOBODY, "unix", d));
    let log = s.vtpm_log(&v.uuid);
    let refusals = log.matches("refused a connection").count();
    assert!((1..=15).contains(&refusals), "{refusals} refusal lines for 302 refused connections:\n{log}");
    assert!(log.contains(&format!("uid={OTHER}")), "{log}");

    // A restart keeps the consumer and the sockets (recorded at create).
    s.stop_vtpm(&v.uuid);
    assert!(!dir.exists(), "stop leaves the socket directory behind");
    let v2 = s.start_vtpm(&v.uuid);
    assert_eq!(v2.socket.as_deref(), Some(data.as_path()));
    assert_eq!(mode(dir), (NOBODY, 0o700));
    assert_eq!(mode(&data), (NOBODY, 0o600));
    assert!(data_served(NOBODY, "unix", d) && ctrl_served(NOBODY, "unix", c));
    assert_eq!(probe_as(OTHER, "unix", d, &get_random(8), 20, 1), "ERR 13");

    // Without a consumer only root is served.
    let r = s.create_vtpm_with(&[]);
    let rd = r.socket.clone().unwrap();
    assert_eq!(mode(rd.parent().unwrap()), (0, 0o700));
    assert_eq!(mode(&rd), (0, 0o600));
    assert_eq!(rc(&r.command(&get_random(8))), 0);
    assert_eq!(probe_as(NOBODY, "unix", rd.to_str().unwrap(), &get_random(8), 20, 1), "ERR 13");
}

#[test]
fn tcp_only_on_request_and_only_for_root_and_the_consumer() {
    let s = Stack::start();
    // TCP listener, no consumer: root only.
    let v = s.create_vtpm();
    let port = v.port.unwrap();
    let (data, ctrl) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{}", port + 1));
    assert_eq!(rc(&raw_command(port, &get_random(8))), 0);
    assert!(data_served(0, "tcp", &data) && ctrl_served(0, "tcp", &ctrl));
    assert!(!data_served(OTHER, "tcp", &data), "another uid was served on the TCP data channel");
    assert!(!ctrl_served(OTHER, "tcp", &ctrl), "another uid was served on the TCP control channel");
    assert!(!data_served(NOBODY, "tcp", &data), "a uid that is not the consumer was served");
    // tpm2-tools as another user fails; as root it works.
    let other = Command::new("tpm2_getrandom")
        .arg("8")
        .env("TPM2TOOLS_TCTI", v.tcti())
        .uid(OTHER)
        .gid(OTHER)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(!other.status.success(), "tpm2_getrandom as uid {OTHER} succeeded");
    xvtpm_tests::tpm2(&v.tcti(), &["tpm2_getrandom", "--hex", "8"]);
    // 300 refused connections log a handful of lines.
    assert!(!probe_as(OTHER, "tcp", &ctrl, &[0, 0, 0, 2, 0, 0, 0, 0], 4, 300).starts_with("REPLY"));
    let log = s.vtpm_log(&v.uuid);
    let refusals = log.matches("refused a connection").count();
    assert!((1..=15).contains(&refusals), "{refusals} refusal lines:\n{log}");

    // With a consumer, the consumer is served on TCP too; others are not.
    let q = s.create_vtpm_with(&["--listen", "tcp:127.0.0.1:0", "--consumer", &NOBODY.to_string()]);
    let qp = q.port.unwrap();
    let (qd, qc) = (format!("127.0.0.1:{qp}"), format!("127.0.0.1:{}", qp + 1));
    assert!(data_served(NOBODY, "tcp", &qd) && ctrl_served(NOBODY, "tcp", &qc));
    assert!(!data_served(OTHER, "tcp", &qd) && !ctrl_served(OTHER, "tcp", &qc));
    let consumer = Command::new("tpm2_getrandom")
        .args(["--hex", "8"])
        .env("TPM2TOOLS_TCTI", q.tcti())
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(consumer.status.success(), "tpm2_getrandom as the consumer: {}", String::from_utf8_lossy(&consumer.stderr));

    // A listener other users' remote peers could reach is refused up front.
    let out = s.xl(&["vtpm", "create", "--listen", "tcp:0.0.0.0:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"), "{}", String::from_utf8_lossy(&out.stderr));
}
