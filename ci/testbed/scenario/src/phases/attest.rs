//! attest-service: the tenant's end-to-end attestation through the provider's service
//! (docs/attestation-service.md). `xvtpm-attestd` on 127.0.0.1 (port 0: the kernel picks a free
//! one and the service prints it) with a service certificate and a tenant CA made here
//! (openssl); tenant alice registered and bound to the vTPM of vtpm-guest; alice's
//! `xl-vtpm attest` starts from nothing but the vendor root (the CA that certified the host TPM's
//! EK, build-images.sh) and host-eventlog's event-log policy: exit 0 with the verified deep quote.
//! Tenant bob asking for alice's vTPM: exit 6 (403), the same answer as for a vTPM that does not
//! exist; a wrong vendor root: exit 7 naming the EK certificate chain.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::St;
use crate::cmd::{Cmd, kill_child, show, show_tail, stop_child};
use crate::runner::{Cx, Errs, Outcome};
use crate::xen;

const P: &str = "/tmp/attest";
const VENDOR_ROOT: &str = "/etc/xvtpm-testbed/vendor-root.pem";
const VENDOR_INTERMEDIATE: &str = "/etc/xvtpm-testbed/vendor-intermediate.pem";
const ATT_LOG: &str = "/var/log/xvtpm/attestd.log";
/// A vTPM that does not exist: bob's answer for it must equal his answer for alice's.
const NOSUCH: &str = "00000000-0000-4000-8000-0000000000aa";

fn f(name: &str) -> String {
    format!("{P}/{name}")
}

fn openssl(cx: &Cx, args: &[&str]) -> Result<(), String> {
    let mut argv = vec!["openssl"];
    argv.extend_from_slice(args);
    let o = Cmd::new(&argv)
        .env("OPENSSL_CONF", "/etc/ssl/openssl.cnf")
        .secs(30)
        .run(cx);
    if o.ok() {
        Ok(())
    } else {
        Err(o.failed(&format!("openssl {}", args.first().unwrap_or(&""))))
    }
}

/// A new P-256 key in `key` and its certificate in `pem`, valid 2 days, subject `subj`; `extra`:
/// the issuer (`-CA`, `-CAkey`, `-set_serial`; none: self-signed) and the extensions.
fn ec_cert(cx: &Cx, key: &str, pem: &str, subj: &str, extra: &[&str]) -> Result<(), String> {
    let mut args = vec![
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-out",
        pem,
        "-days",
        "2",
        "-subj",
        subj,
    ];
    args.extend_from_slice(extra);
    openssl(cx, &args)
}

/// A self-signed P-256 CA: `<P>/NAME.pem`, `NAME.key`.
fn ca(cx: &Cx, name: &str, cn: &str) -> Result<(), String> {
    ec_cert(
        cx,
        &f(&format!("{name}.key")),
        &f(&format!("{name}.pem")),
        &format!("/CN={cn}"),
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

/// A P-256 leaf issued by the CA `issuer` (one openssl run), with the extensions `ext`.
fn leaf(cx: &Cx, name: &str, issuer: &str, cn: &str, ext: &[&str]) -> Result<(), String> {
    let (ca_pem, ca_key) = (f(&format!("{issuer}.pem")), f(&format!("{issuer}.key")));
    let mut serial = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut u| std::io::Read::read_exact(&mut u, &mut serial))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let serial = format!("0x{}", hex::encode(serial));
    let mut extra = vec![
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-set_serial",
        &serial,
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "keyUsage=critical,digitalSignature",
    ];
    for x in ext {
        extra.extend_from_slice(&["-addext", x]);
    }
    ec_cert(
        cx,
        &f(&format!("{name}.key")),
        &f(&format!("{name}.pem")),
        &format!("/CN={cn}"),
        &extra,
    )
}

/// The phase's PKI: the provider's service CA + server certificate (127.0.0.1), its tenant CA +
/// alice's and bob's client certificates, and a CA that is not the host TPM's vendor.
fn pki(cx: &Cx) -> Result<(), String> {
    ca(cx, "service-ca", "testbed provider service CA")?;
    ca(cx, "tenant-ca", "testbed provider tenant CA")?;
    ca(cx, "other-vendor", "not the host TPM's vendor")?;
    leaf(
        cx,
        "server",
        "service-ca",
        "xvtpm-attestd",
        &[
            "extendedKeyUsage=serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
    )?;
    leaf(
        cx,
        "alice",
        "tenant-ca",
        "alice",
        &["extendedKeyUsage=clientAuth"],
    )?;
    leaf(
        cx,
        "bob",
        "tenant-ca",
        "bob",
        &["extendedKeyUsage=clientAuth"],
    )
}

/// `xvtpm-attestd`, stopped (SIGTERM, then SIGKILL) when dropped.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start(cx: &Cx) -> Result<Service, String> {
        let out = f("attestd.out");
        let so = fs::File::create(&out).map_err(|e| format!("{out}: {e}"))?;
        let se = fs::File::create(ATT_LOG).map_err(|e| format!("{ATT_LOG}: {e}"))?;
        let (cert, key, tca) = (f("server.pem"), f("server.key"), f("tenant-ca.pem"));
        let mut child = Command::new("xvtpm-attestd")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--cert",
                &cert,
                "--key",
                &key,
                "--tenant-ca",
                &tca,
            ])
            .args(["--ek-intermediate", VENDOR_INTERMEDIATE])
            .env("XVTPM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(so)
            .stderr(se)
            .spawn()
            .map_err(|e| format!("xvtpm-attestd: cannot start: {e}"))?;
        cx.wait_until(30, || {
            xen::read_text(&out).contains("\"ready\":true") || !matches!(child.try_wait(), Ok(None))
        });
        let port = xen::parse_json(&xen::read_text(&out)).and_then(|v| {
            v.get("listen")?
                .as_str()?
                .rsplit_once(':')?
                .1
                .parse::<u16>()
                .ok()
        });
        // dropped on the error path below: stopped
        let mut svc = Service {
            child,
            port: port.unwrap_or(0),
        };
        if port.is_none() || !matches!(svc.child.try_wait(), Ok(None)) {
            return Err(format!(
                "xvtpm-attestd not ready within 30 s: {} {}",
                xen::read_text(&out).trim(),
                crate::cmd::tail_lines(&xen::read_text(ATT_LOG), 5).replace('\n', " ")
            ));
        }
        println!(
            "xvtpm-attestd ready on 127.0.0.1:{} (pid {}): {}",
            svc.port,
            svc.child.id(),
            xen::read_text(&out).trim()
        );
        Ok(svc)
    }

    /// SIGTERM and up to 10 s; false if it needed a SIGKILL.
    fn stop(&mut self, cx: &Cx) -> bool {
        stop_child(cx, &mut self.child, 10)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill_child(&mut self.child);
        }
    }
}

/// A tenant as `xl-vtpm attest` sees it: its certificate (`<P>/CERT.pem` + `.key`), its trust
/// store (`<P>/STORE`) and the vendor root it trusts.
struct Who<'a> {
    cert: &'a str,
    store: &'a str,
    root: &'a str,
}

/// `xl-vtpm --json attest` as `who` through `svc`: (exit code, output), kept in `<P>/TAG.out`.
fn attest(
    cx: &Cx,
    svc: &Service,
    tag: &str,
    who: &Who,
    vtpm: &str,
    extra: &[&str],
) -> (i32, String) {
    let url = format!("https://127.0.0.1:{}", svc.port);
    let (c, k, sca, st) = (
        f(&format!("{}.pem", who.cert)),
        f(&format!("{}.key", who.cert)),
        f("service-ca.pem"),
        f(who.store),
    );
    let mut argv = vec![
        "xl-vtpm",
        "--json",
        "attest",
        "--service",
        &url,
        "--cert",
        &c,
        "--key",
        &k,
        "--service-ca",
        &sca,
        "--ek-ca",
        who.root,
        "--trust-store",
        &st,
        "--vtpm",
        vtpm,
    ];
    argv.extend_from_slice(extra);
    let o = Cmd::new(&argv)
        .secs(120)
        .save(&f(&format!("{tag}.out")))
        .run(cx);
    show_tail(&format!("attest {tag}"), &o.all(), 60);
    (o.rc, o.all())
}

fn squeeze(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

pub fn attest_service(cx: &Cx, st: &mut St) -> Outcome {
    let t0 = super::up();
    let out = attest_service_checks(cx, st);
    println!("PERF attest-service-s={}", super::secs1(t0, super::up()));
    out
}

fn attest_service_checks(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if st.vtpm_uuid.is_empty() || st.vtpm_exited() {
        return Outcome::fail("no running vTPM (vtpm-create)");
    }
    if fs::metadata(super::eventlog::POLICY)
        .map(|m| m.len())
        .unwrap_or(0)
        == 0
    {
        return Outcome::fail("no host event log policy (host-eventlog)");
    }
    if !Path::new("/usr/bin/xvtpm-attestd").is_file() || !Path::new("/usr/bin/openssl").is_file() {
        return Outcome::fail("xvtpm-attestd or openssl missing from dom0's image");
    }
    if !Path::new(VENDOR_ROOT).is_file() {
        return Outcome::fail("no vendor root (build-images.sh manufactures the host TPM)");
    }
    let _ = fs::remove_dir_all(P);
    if let Err(m) = fs::create_dir_all(P) {
        return Outcome::fail(format!("{P}: {m}"));
    }
    if let Err(m) = pki(cx) {
        return Outcome::fail(m);
    }
    let uuid = st.vtpm_uuid.clone();
    let (alice, bob) = (f("alice.pem"), f("bob.pem"));
    for t in [
        vec!["tenant", "add", "alice", "--cert", &alice],
        vec!["tenant", "bind", "alice", &uuid],
        vec!["tenant", "add", "bob", "--cert", &bob],
    ] {
        let mut argv = vec!["xl-vtpm"];
        argv.extend_from_slice(&t);
        let o = Cmd::new(&argv).secs(30).run(cx);
        show("xl-vtpm tenant", &o.all());
        if !o.ok() {
            return Outcome::fail(format!(
                "xl-vtpm {}: exit {}: {}",
                t.join(" "),
                o.rc,
                o.tail1(2)
            ));
        }
    }
    let mut svc = match Service::start(cx) {
        Ok(s) => s,
        Err(m) => return Outcome::fail(m),
    };
    // 1. alice, from nothing but the vendor root and her event-log policy: enroll, quote, verify -> 0
    let policy = f("alice-host-policy.json");
    if let Err(m) = fs::copy(super::eventlog::POLICY, &policy) {
        return Outcome::fail(format!("{policy}: {m}"));
    }
    let save = f("alice-evidence");
    let (rc, out) = attest(
        cx,
        &svc,
        "alice",
        &Who {
            cert: "alice",
            store: "alice-store",
            root: VENDOR_ROOT,
        },
        &uuid,
        &["--event-log-policy", &policy, "--save", &save],
    );
    let j = squeeze(&out);
    let ok = rc == 0
        && out.contains("enrolled host")
        && j.contains("\"verified\":true")
        && j.contains("\"host_state_checked\":true")
        && j.contains("\"event_log\":{\"events\":")
        && !j.contains("\"event_log\":{\"events\":0")
        && j.contains(&format!("\"vtpm\":\"{uuid}\""));
    e.check(
        "attest-tenant",
        ok,
        format!("exit={rc} (want 0: host enrolled through the service from the vendor root, event log replayed under the policy, deep quote of {uuid} verified)"),
    );
    // 2. bob (registered, owns no vTPM) asks for alice's vTPM and for one that does not exist: the
    // same 403 (exit 6). He gets a copy of alice's trust store (the host's public AKs), so both
    // answers start past enrollment and differ in nothing but the UUID asked for.
    let copied = Cmd::new(&["cp", "-a", &f("alice-store"), &f("bob-store")])
        .secs(20)
        .run(cx);
    if !copied.ok() {
        e.add("copy-trust-store");
    }
    let bob_who = Who {
        cert: "bob",
        store: "bob-store",
        root: VENDOR_ROOT,
    };
    let (rc_bob, out_bob) = attest(cx, &svc, "bob", &bob_who, &uuid, &[]);
    let (rc_miss, out_miss) = attest(cx, &svc, "bob-missing", &bob_who, NOSUCH, &[]);
    let same = out_bob.replace(&uuid, "UUID") == out_miss.replace(NOSUCH, "UUID");
    e.check(
        "attest-other-tenant",
        rc_bob == 6 && rc_miss == 6 && out_bob.contains("HTTP 403") && same,
        format!(
            "exit={rc_bob}, nonexistent vTPM exit={rc_miss} (want 6 and 6, the same 403 answer)"
        ),
    );
    // 3. alice with a wrong vendor root and an empty trust store: exit 7 naming the EK chain, nothing pinned
    let other = f("other-vendor.pem");
    let (rc_w, out_w) = attest(
        cx,
        &svc,
        "wrong-root",
        &Who {
            cert: "alice",
            store: "wrong-root-store",
            root: &other,
        },
        &uuid,
        &["--event-log-policy", &policy],
    );
    let pinned = fs::read_dir(f("wrong-root-store"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    e.check(
        "attest-wrong-vendor-root",
        rc_w == 7 && out_w.contains("EK certificate chain") && !pinned,
        format!("exit={rc_w} (want 7 naming the EK certificate chain; nothing pinned)"),
    );
    if !svc.stop(cx) {
        e.add("attestd-did-not-exit");
    }
    show_tail("attestd", &xen::read_text(ATT_LOG), 5);
    e.verdict(
        "xvtpm-attestd (mutual TLS): tenant attest from the vendor root + event-log policy -> 0; another tenant's vTPM -> 6 (403, same as a missing one); wrong vendor root -> 7 (EK certificate chain)",
    )
}
