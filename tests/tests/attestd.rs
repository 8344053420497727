//! The attestation service end to end: a real swtpm with an EK certificate from swtpm's local
//! CA as the host TPM, the real manager and vtpm-domains (libtpms), `xvtpm-attestd` over real
//! TLS on loopback with certificates made here (rcgen), and the tenant's `xl-vtpm attest`.
//! Raw HTTP probes (slow, oversized, rate) are Python's ssl module: a real, independent client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use testkit::bin_path;
use xvtpm_tests::{Options, Stack};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A CA made here: its certificate and key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// Writes `<dir>/<name>.pem` and `<name>.key` for a leaf issued by `issuer`.
fn leaf(dir: &Path, name: &str, issuer: &Ca, server: bool) -> (PathBuf, PathBuf) {
    let sans = if server { vec!["localhost".to_string()] } else { vec![] };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    if server {
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn write_ca(dir: &Path, name: &str, ca: &Ca) -> PathBuf {
    let f = dir.join(format!("{name}.pem"));
    std::fs::write(&f, ca.cert.pem()).unwrap();
    f
}

struct Service {
    child: Child,
    port: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    s: Stack,
    svc: Service,
    dir: PathBuf,
    svc_ca: PathBuf,
    tenant_ca: Ca,
    alice: (PathBuf, PathBuf),
    a: uuid::Uuid,
    b: uuid::Uuid,
}

fn start_service(s: &Stack, dir: &Path, server: &(PathBuf, PathBuf), tenant_ca: &Path, extra: &[&str]) -> Service {
    let ca = s.ek_ca.as_ref().unwrap();
    let log = std::fs::File::create(dir.join("attestd.log")).unwrap();
    let mut child = Command::new(bin_path("xvtpm-attestd"))
        .args(["--listen", "127.0.0.1:0", "--cert", p(&server.0), "--key", p(&server.1), "--tenant-ca", p(tenant_ca)])
        .args(["--run-dir", p(&s.run_dir()), "--state-dir", p(&s.state_dir()), "--event-log", p(&dir.join("eventlog.bin"))])
        .args(["--ek-intermediate", p(&ca.intermediate_cert())])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}: {}", std::fs::read_to_string(dir.join("attestd.log")).unwrap_or_default()));
    let port = v["listen"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
    Service { child, port }
}

fn world(extra: &[&str]) -> World {
    let s = Stack::start_with(Options { ek_cert: true, ..Default::default() });
    let dir = s.dir.path().join("attest");
    std::fs::create_dir_all(&dir).unwrap();
    // The host's event log: any bytes the service serves as they are (eventlog.rs covers logs).
    std::fs::write(dir.join("eventlog.bin"), b"not a real log").unwrap();
    let svc_ca_ = ca("provider service CA");
    let tenant_ca = ca("provider tenant CA");
    let svc_ca = write_ca(&dir, "service-ca", &svc_ca_);
    let tenant_ca_file = write_ca(&dir, "tenant-ca", &tenant_ca);
    let server = leaf(&dir, "server", &svc_ca_, true);
    let alice = leaf(&dir, "alice", &tenant_ca, false);
    let bob = leaf(&dir, "bob", &tenant_ca, false);
    let (a, b) = (s.create_vtpm().uuid, s.create_vtpm().uuid);
    for (name, cert, v) in [("alice", &alice.0, a), ("bob", &bob.0, b)] {
        let o = s.xl(&["tenant", "add", name, "--cert", p(cert)]);
        assert!(o.status.success(), "{}", text(&o));
        let o = s.xl(&["tenant", "bind", name, &v.to_string()]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let svc = start_service(&s, &dir, &server, &tenant_ca_file, extra);
    World { s, svc, dir, svc_ca, tenant_ca, alice, a, b }
}

impl World {
    fn attest(&self, who: &(PathBuf, PathBuf), root: &Path, store: &str, vtpm: &uuid::Uuid, extra: &[&str]) -> Output {
        let url = format!("https://localhost:{}", self.svc.port);
        let mut args = vec!["attest", "--service", &url, "--cert", p(&who.0), "--key", p(&who.1), "--service-ca", p(&self.svc_ca)];
        let store = self.dir.join(store);
        let v = vtpm.to_string();
        args.extend_from_slice(&["--ek-ca", p(root), "--trust-store", p(&store), "--vtpm", &v]);
        args.extend_from_slice(extra);
        self.s.xl(&args)
    }

    /// One raw HTTPS exchange (Python's ssl): MODE selects what the client does; prints
    /// `STATUS <code>` lines, `HEADER retry-after <v>`, `BODY <text>`, or `CLOSED`/`REFUSED <why>`.
    fn probe(&self, who: Option<&(PathBuf, PathBuf)>, mode: &str, arg: &str) -> String {
        let (c, k) = who.map(|(c, k)| (p(c).to_string(), p(k).to_string())).unwrap_or_default();
        let out = Command::new("python3")
            .arg("-c")
            .arg(PROBE)
            .args([&self.svc.port.to_string(), p(&self.svc_ca), &c, &k, mode, arg])
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

const PROBE: &str = r#"
import socket, ssl, sys
port, ca, cert, key, mode, arg = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
ctx = ssl.create_default_context(cafile=ca)
if cert:
    ctx.load_cert_chain(cert, key)
def conn():
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    return ctx.wrap_socket(s, server_hostname="localhost")
def read_all(s):
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except (ConnectionResetError, ssl.SSLError) as e:
            break
        if not b:
            break
        out += b
        if b"\r\n\r\n" in out:
            head, _, body = out.partition(b"\r\n\r\n")
            n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
            if n and len(body) >= n[0]:
                break
    return out
def report(out):
    if not out:
        print("CLOSED"); return
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    print("STATUS", lines[0].split()[1].decode())
    for l in lines[1:]:
        if l.lower().startswith(b"retry-after:"):
            print("HEADER retry-after", l.split(b":")[1].strip().decode())
    print("BODY", body.decode(errors="replace"))
def request(method, path, body=b"", extra=b""):
    return (method + " " + path + " HTTP/1.1\r\nHost: localhost\r\nContent-Length: " + str(len(body)) + "\r\n").encode() + extra + b"\r\n" + body
try:
    s = conn()
    if mode == "get":
        s.sendall(request("GET", arg)); report(read_all(s))
    elif mode == "post":
        path, _, body = arg.partition(" ")
        s.sendall(request("POST", path, body.encode())); report(read_all(s))
    elif mode == "huge":
        # Announces 1 GiB, sends 100 bytes, then waits for the answer.
        s.sendall(b"POST /v1/activate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1073741824\r\n\r\n" + b"{" * 100)
        report(read_all(s))
    elif mode == "slow":
        # Half a request line, then nothing.
        s.sendall(b"GET /v1/vtpms HTTP/1.1\r\nHost: loc")
        report(read_all(s))
    elif mode == "burst":
        for i in range(int(arg)):
            s2 = conn()
            s2.sendall(request("GET", "/v1/vtpms")); report(read_all(s2)); s2.close()
except ssl.SSLError as e:
    print("REFUSED", e)
except ConnectionResetError as e:
    print("REFUSED", e)
"#;

#[test]
fn a_tenant_attests_its_vtpm_from_the_vendor_root_and_its_policy() {
    let w = world(&[]);
    let root = w.s.ek_ca.as_ref().unwrap().root_cert();
    let save = w.dir.join("save");
    // First contact: enrolled through the service, quote verified, but no host policy: 8.
    let o = w.attest(&w.alice, &root, "store", &w.a, &["--save", p(&save)]);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
    assert!(text(&o).contains("enrolled host"), "{}", text(&o));
    let bundle = vtpm_proto::evidence::Bundle::decode(&std::fs::read(save.join("evidence.bin")).unwrap()).unwrap();
    assert_eq!(bundle.leaf.vtpm_uuid, w.a);
    let policy = w.dir.join("host.json");
    xvtpm_tests::write_host_policy(&policy, &bundle);
    // With the tenant's policy: exit 0; the host is pinned already, no second enrollment.
    let o = w.attest(&w.alice, &root, "store", &w.a, &["--host-pcrs-policy", p(&policy)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("enrolled host"), "{}", text(&o));
    assert!(text(&o).contains(&format!("verified: vTPM {}", w.a)), "{}", text(&o));
    // The event log is the configured file, served as is.
    assert!(w.probe(Some(&w.alice), "get", "/v1/eventlog").contains("BODY not a real log"));
    // The tenant's own vTPM list.
    let list = w.probe(Some(&w.alice), "get", "/v1/vtpms");
    assert!(list.contains("STATUS 200") && list.contains(&w.a.to_string()) && !list.contains(&w.b.to_string()), "{list}");
}

#[test]
fn another_tenants_vtpm_is_the_same_403_as_a_missing_one_and_strangers_are_refused() {
    let w = world(&[]);
    let body = r#"{"nonce":"00","vpcrs":[0],"host_pcrs":[0]}"#;
    let theirs = w.probe(Some(&w.alice), "post", &format!("/v1/vtpms/{}/deep-quote {body}", w.b));
    let missing = w.probe(Some(&w.alice), "post", &format!("/v1/vtpms/{}/deep-quote {body}", uuid::Uuid::new_v4()));
    assert!(theirs.contains("STATUS 403"), "{theirs}");
    assert_eq!(theirs, missing, "a tenant learns nothing about other tenants' vTPMs");
    // The tenant command names the refusal.
    let root = w.s.ek_ca.as_ref().unwrap().root_cert();
    let o = w.attest(&w.alice, &root, "store", &w.b, &[]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(text(&o).contains("HTTP 403"), "{}", text(&o));
    // No client certificate: the handshake is refused.
    let none = w.probe(None, "get", "/v1/vtpms");
    assert!(none.contains("REFUSED") || none.contains("CLOSED"), "{none}");
    // A certificate from another CA: refused in the handshake.
    let stranger_ca = ca("someone else");
    let stranger = leaf(&w.dir, "stranger", &stranger_ca, false);
    let s = w.probe(Some(&stranger), "get", "/v1/vtpms");
    assert!(s.contains("REFUSED") || s.contains("CLOSED"), "{s}");
    // The tenant CA's certificate of a key no tenant registered: 403.
    let mallory = leaf(&w.dir, "mallory", &w.tenant_ca, false);
    let m = w.probe(Some(&mallory), "get", "/v1/vtpms");
    assert!(m.contains("STATUS 403") && m.contains("not registered"), "{m}");
}

#[test]
fn bodies_are_bounded_slow_clients_cut_off_and_tenants_rate_limited() {
    let w = world(&["--request-timeout", "2", "--rate", "0.2", "--burst", "5"]);
    // 1 GiB announced: 413 at once, the body never read.
    let huge = w.probe(Some(&w.alice), "huge", "");
    assert!(huge.contains("STATUS 413"), "{huge}");
    // Half a request line, then silence: the connection is closed (no answer, or a 408).
    let slow = w.probe(Some(&w.alice), "slow", "");
    assert!(slow.contains("CLOSED") || slow.contains("STATUS 408"), "{slow}");
    // 4 requests are left of alice's burst of 5: the next ones get 429 with Retry-After.
    let burst = w.probe(Some(&w.alice), "burst", "8");
    assert!(burst.matches("STATUS 200").count() >= 3, "{burst}");
    assert!(burst.contains("STATUS 429") && burst.contains("HEADER retry-after"), "{burst}");
}

#[test]
fn a_wrong_ek_chain_is_named_by_the_tenant_command() {
    let w = world(&[]);
    let other = testkit::LocalCa::new();
    let _made_by_other = testkit::Swtpm::start_manufactured(&other);
    let o = w.attest(&w.alice, &other.root_cert(), "store", &w.a, &[]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("EK certificate chain"), "{}", text(&o));
    assert!(!w.dir.join("store").exists() || std::fs::read_dir(w.dir.join("store")).unwrap().next().is_none(), "nothing pinned");
}

#[test]
fn an_ek_certificate_of_another_tpm_fails_credential_activation_by_name() {
    let mut w = world(&[]);
    // A second TPM of the same vendor: its genuine EK certificate chains to the same root.
    let ca = w.s.ek_ca.as_ref().unwrap();
    let other = testkit::Swtpm::start_manufactured(ca);
    let other_cert = w.dir.join("other-ek.der");
    xvtpm_tests::tpm2(&other.tcti(), &["tpm2_nvread", "-C", "o", "-o", p(&other_cert), "0x01c00002"]);
    let size = std::fs::metadata(&other_cert).unwrap().len().to_string();
    // The provider's host TPM now carries that certificate in its EK certificate index (the
    // manager is stopped while tpm2-tools use the TPM): the service's enrollment material
    // names an EK that is not this TPM's.
    w.s.stop_manager();
    let hw = w.s.swtpm.tcti();
    xvtpm_tests::tpm2(&hw, &["tpm2_nvundefine", "-C", "p", "0x01c00002"]);
    xvtpm_tests::tpm2(&hw, &["tpm2_nvdefine", "0x01c00002", "-C", "p", "-s", &size, "-a", "ppwrite|ppread|ownerread|authread|no_da|platformcreate"]);
    xvtpm_tests::tpm2(&hw, &["tpm2_nvwrite", "0x01c00002", "-C", "p", "-i", p(&other_cert)]);
    w.s.start_manager();
    let root = w.s.ek_ca.as_ref().unwrap().root_cert();
    // The chain verifies (same vendor), so the tenant makes its credential for the other TPM's
    // EK; the host's TPM cannot activate it: exit 7, naming the check; nothing pinned.
    let o = w.attest(&w.alice, &root, "store", &w.a, &[]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("credential activation") && text(&o).contains("did not activate"), "{}", text(&o));
    assert!(!text(&o).contains("EK certificate chain"), "{}", text(&o));
    assert_eq!(text(&o).matches("credential activation").count(), 1, "the check is named once: {}", text(&o));
    assert!(!w.dir.join("store").exists() || std::fs::read_dir(w.dir.join("store")).unwrap().all(|e| std::fs::read_dir(e.unwrap().path()).unwrap().next().is_none()), "nothing pinned");
    drop(other);
}

#[test]
fn a_malformed_activation_is_400_and_one_the_tpm_refuses_is_422() {
    let w = world(&[]);
    let group = w.s.xl_json(&["mgr", "group", "list"])[0]["uuid"].as_str().unwrap().to_string();
    // Not hex: refused by the service before the TPM sees it.
    let bad = w.probe(Some(&w.alice), "post", &format!(r#"/v1/activate {{"group":"{group}","credential_blob":"zz","encrypted_secret":"00"}}"#));
    assert!(bad.contains("STATUS 400") && bad.contains("credential_blob: not hex"), "{bad}");
    // Well-formed, but no credential made for this TPM's EK: the TPM refuses it, 422 with the reason.
    let blob = format!("0020{}0020{}", "11".repeat(32), "22".repeat(32));
    let secret = "33".repeat(256);
    let refused = w.probe(Some(&w.alice), "post", &format!(r#"/v1/activate {{"group":"{group}","credential_blob":"{blob}","encrypted_secret":"{secret}"}}"#));
    assert!(refused.contains("STATUS 422"), "{refused}");
    assert!(refused.contains("TPM2_ActivateCredential with the AK of group"), "the manager's reason: {refused}");
    // An unknown group: 422 too, naming the group.
    let unknown = uuid::Uuid::new_v4();
    let u = w.probe(Some(&w.alice), "post", &format!(r#"/v1/activate {{"group":"{unknown}","credential_blob":"{blob}","encrypted_secret":"{secret}"}}"#));
    assert!(u.contains("STATUS 422") && u.contains(&format!("no group \\\"{unknown}\\\"")), "{u}");
}

#[test]
fn a_vtpms_host_quote_socket_goes_with_it_and_a_foreign_one_is_never_removed() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let s = Stack::start();
    let a = s.create_vtpm();
    let sock = s.run_dir().join("vtpms").join(format!("{}.quote", a.uuid));
    let is_socket = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    assert!(is_socket(&sock));
    // Stopped: the socket is gone (the service answers "not running", not a refused connect).
    s.stop_vtpm(&a.uuid);
    assert!(std::fs::symlink_metadata(&sock).is_err(), "vtpm stop leaves {} behind", sock.display());
    // Started again: a new one; destroyed: gone.
    s.start_vtpm(&a.uuid);
    assert!(is_socket(&sock));
    let o = s.xl(&["vtpm", "destroy", "--yes", &a.uuid.to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::symlink_metadata(&sock).is_err(), "vtpm destroy leaves {} behind", sock.display());
    // Another user's socket at a stopped vTPM's path is neither replaced at start nor removed
    // at stop; a symlink there is not followed.
    let b = s.create_vtpm();
    let sock = s.run_dir().join("vtpms").join(format!("{}.quote", b.uuid));
    s.stop_vtpm(&b.uuid);
    let foreign = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::os::unix::fs::chown(&sock, Some(65534), Some(65534)).unwrap();
    let o = s.xl(&["vtpm", "start", &b.uuid.to_string()]);
    assert!(!o.status.success(), "started over another user's socket: {}", text(&o));
    let all = format!("{}{}", text(&o), s.vtpm_log(&b.uuid));
    assert!(all.contains("uid 65534") && all.contains("not removed"), "{all}");
    s.xl(&["vtpm", "stop", &b.uuid.to_string()]);
    assert_eq!(std::fs::symlink_metadata(&sock).unwrap().uid(), 65534, "the other user's socket is left alone");
    drop(foreign);
    std::fs::remove_file(&sock).unwrap();
    let target = s.dir.path().join("elsewhere.sock");
    let _target = std::os::unix::net::UnixListener::bind(&target).unwrap();
    std::os::unix::fs::symlink(&target, &sock).unwrap();
    s.xl(&["vtpm", "stop", &b.uuid.to_string()]);
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_symlink(), "a symlink is not removed");
    assert!(is_socket(&target), "nor what it points to");
    let o = s.xl(&["vtpm", "start", &b.uuid.to_string()]);
    assert!(!o.status.success(), "started over a symlink: {}", text(&o));
    assert!(is_socket(&target), "the symlink's target is untouched");
}
