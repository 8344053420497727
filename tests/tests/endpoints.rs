//! A vTPM keeps its endpoints across `vtpm stop` / `vtpm start`: a TCP listener created
//! with port 0 keeps the port it got at create (picked below the ephemeral range), and a vTPM created with `--name NAME` is
//! reachable at `<run-dir>/NAME` (data) and `<run-dir>/NAME.ctrl` (control) — symlinks to
//! its sockets, the pair the tpm2-tss `swtpm:path=` TCTI and QEMU's `-chardev path=` use.
//! Real manager, real vTPM processes, real tpm2-tools.

use std::path::Path;

use xvtpm_tests::{Stack, tpm2};

fn getrandom(tcti: &str) {
    let hex = tpm2(tcti, &["tpm2_getrandom", "--hex", "8"]);
    assert_eq!(hex.trim().len(), 16, "{hex}");
}

#[test]
fn a_tcp_port_picked_at_create_is_kept_by_every_start() {
    let s = Stack::start();
    let v = s.create_vtpm_with(&["--listen", "tcp:127.0.0.1:0", "--name", "tcp-one"]);
    let port = v.port.expect("listens on TCP");
    // Picked below the kernel's ephemeral range: no outgoing connection takes it while the vTPM is stopped.
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let ephemeral_low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        port + 1 < ephemeral_low,
        "port {port} is in the ephemeral range ({range})"
    );
    getrandom(&v.tcti());
    let show = s.xl_json(&["vtpm", "show", &v.uuid.to_string()]);
    assert_eq!(show["name"], "tcp-one", "{show}");
    for _ in 0..2 {
        s.stop_vtpm(&v.uuid);
        let w = s.start_vtpm(&v.uuid);
        assert_eq!(w.port, Some(port), "the vTPM moved from port {port}");
        getrandom(&w.tcti());
    }
    // A listener given to `start` is for that run only; the next start is back on the recorded port.
    s.stop_vtpm(&v.uuid);
    let w = Stack::handle(&s.xl_json(&[
        "vtpm",
        "start",
        &v.uuid.to_string(),
        "--listen",
        "tcp:127.0.0.1:0",
    ]));
    assert_ne!(w.port, Some(port));
    s.stop_vtpm(&v.uuid);
    assert_eq!(s.start_vtpm(&v.uuid).port, Some(port));

    // Taken meanwhile: the start fails and names the port.
    s.stop_vtpm(&v.uuid);
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = s.xl(&["vtpm", "start", "tcp-one"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(squatter);
    assert_eq!(s.start_vtpm(&v.uuid).port, Some(port));
}

#[test]
fn a_named_vtpm_is_reachable_at_its_name_across_stop_and_start() {
    let s = Stack::start();
    let v = s.create_vtpm_with(&["--name", "web1"]);
    let (data, ctrl) = (s.run_dir().join("web1"), s.run_dir().join("web1.ctrl"));
    let sock = v.socket.clone().expect("default Unix sockets");
    assert_eq!(std::fs::read_link(&data).unwrap(), sock);
    assert_eq!(
        std::fs::read_link(&ctrl).unwrap(),
        Path::new(&format!("{}.ctrl", sock.display()))
    );
    let tcti = format!("swtpm:path={}", data.display());
    getrandom(&tcti);

    // The run directory is lost (a reboot empties /run): start puts the links back.
    // Commands take the name for the UUID.
    s.xl_json(&["vtpm", "stop", "web1"]);
    std::fs::remove_file(&data).unwrap();
    std::fs::remove_file(&ctrl).unwrap();
    let w = Stack::handle(&s.xl_json(&["vtpm", "start", "web1"]));
    assert!(w.pid.is_some() && w.pid != v.pid);
    getrandom(&tcti);
    let list = s.xl_json(&["vtpm", "list"]);
    assert_eq!(list[0]["name"], "web1", "{list}");

    // Names are unique, and only ones that cannot collide with the run directory's own files.
    let out = s.xl(&["vtpm", "create", "--name", "web1"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in ["vtpms", "a.b", "../x", "-x", ""] {
        let out = s.xl(&["vtpm", "create", "--name", bad]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--name {bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        s.xl_json(&["vtpm", "list"]).as_array().unwrap().len(),
        1,
        "a refused create left a vTPM"
    );

    // Destroy takes the links with it.
    s.xl_json(&["vtpm", "destroy", &v.uuid.to_string(), "--yes"]);
    assert!(std::fs::symlink_metadata(&data).is_err() && std::fs::symlink_metadata(&ctrl).is_err());
}
