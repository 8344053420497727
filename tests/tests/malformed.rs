//! Malformed input on the data and control channels gets a clear error
//! response and the vTPM keeps serving. Also covers QEMU's way in: the data
//! channel handed over a Unix control socket with CMD_SET_DATAFD.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use xvtpm_tests::{Stack, get_random, raw_command, rc, read_response};

use tpm_wire::{TPM2_RC_BAD_TAG as RC_BAD_TAG, TPM2_RC_COMMAND_SIZE as RC_COMMAND_SIZE};

fn still_serves(port: u16) {
    let r = raw_command(port, &get_random(16));
    assert_eq!(rc(&r), 0, "vTPM stopped serving");
    assert_eq!(r.len(), 10 + 2 + 16);
}

fn send_then_read(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A peer may close early after answering a huge packet; ignore write errors.
    let _ = s.write_all(bytes);
    let r = read_response(&mut s);
    // The same connection keeps working after the error.
    s.write_all(&get_random(4)).unwrap();
    assert_eq!(rc(&read_response(&mut s)), 0, "connection desynchronised after a malformed packet");
    r
}

#[test]
fn malformed_commands_get_tpm_errors_and_the_vtpm_keeps_serving() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let port = v.port.unwrap();

    let short = &get_random(8)[..5];
    assert_eq!(rc(&send_then_read(port, short)), RC_COMMAND_SIZE, "short header");
    still_serves(port);

    let mut lying = get_random(8);
    lying[5] = 200; // declares 200 bytes, sends 12
    assert_eq!(rc(&send_then_read(port, &lying)), RC_COMMAND_SIZE, "size mismatch");
    still_serves(port);

    let mut huge = get_random(8);
    huge[2..6].copy_from_slice(&100_000u32.to_be_bytes());
    assert_eq!(rc(&send_then_read(port, &huge)), RC_COMMAND_SIZE, "size > buffer");
    still_serves(port);

    let mut tiny = get_random(8);
    tiny[2..6].copy_from_slice(&4u32.to_be_bytes());
    assert_eq!(rc(&send_then_read(port, &tiny)), RC_COMMAND_SIZE, "size < header");
    still_serves(port);

    let mut tag = get_random(8);
    tag[0..2].copy_from_slice(&tpm_wire::TPM12_TAG_RQU_COMMAND.to_be_bytes());
    assert_eq!(rc(&send_then_read(port, &tag)), RC_BAD_TAG, "bad tag");
    still_serves(port);

    let garbage: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let r = send_then_read(port, &garbage);
    assert_ne!(rc(&r), 0, "64 KiB of garbage succeeded");
    still_serves(port);

    // An unknown command code with a valid frame reaches libtpms and gets its error.
    let unknown = [0x80, 0x01, 0, 0, 0, 10, 0x00, 0x00, 0x0f, 0xff];
    assert_ne!(rc(&raw_command(port, &unknown)), 0);
    still_serves(port);

    // Guest-triggerable warnings are rate limited: far fewer log lines than bad packets.
    for _ in 0..50 {
        let _ = send_then_read(port, &tag);
    }
    let warnings = s.vtpm_log(&v.uuid).matches("rejected malformed TPM command").count();
    assert!((1..=15).contains(&warnings), "{warnings} warnings logged for ~56 bad packets");
}

fn ctrl(port: u16, req: &[u8], resp_len: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut r = vec![0u8; resp_len];
    s.read_exact(&mut r).unwrap();
    r
}

#[test]
fn control_channel_speaks_swtpm_protocol() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let data = v.port.unwrap();
    let cport = data + 1;
    let caps = u64::from_be_bytes(ctrl(cport, &1u32.to_be_bytes(), 8).try_into().unwrap());
    for bit in [0, 1, 2, 3, 7, 10, 12, 13] {
        assert!(caps & (1 << bit) != 0, "capability bit {bit} missing (QEMU requires it)");
    }
    // SET_LOCALITY 3, then a bad locality.
    assert_eq!(ctrl(cport, &[0, 0, 0, 5, 3], 4), [0, 0, 0, 0]);
    assert_ne!(ctrl(cport, &[0, 0, 0, 5, 9], 4), [0, 0, 0, 0]);
    // GET_TPMESTABLISHED.
    assert_eq!(&ctrl(cport, &4u32.to_be_bytes(), 8)[..4], &[0, 0, 0, 0]);
    // SET_BUFFERSIZE query.
    let b = ctrl(cport, &[0, 0, 0, 0x11, 0, 0, 0, 0], 16);
    assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 4096);
    // STOP: data commands fail; INIT: the TPM comes back (needs Startup again).
    assert_eq!(ctrl(cport, &0x0eu32.to_be_bytes(), 4), [0, 0, 0, 0]);
    assert_ne!(rc(&raw_command(data, &get_random(8))), 0);
    assert_eq!(ctrl(cport, &[0, 0, 0, 2, 0, 0, 0, 0], 4), [0, 0, 0, 0]);
    let startup = tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR);
    assert_eq!(rc(&raw_command(data, &startup)), 0);
    assert_eq!(rc(&raw_command(data, &get_random(8))), 0);
    // An unknown control command gets an error, the channel survives for new connections.
    assert_ne!(ctrl(cport, &0x99u32.to_be_bytes(), 4), [0, 0, 0, 0]);
    assert_eq!(ctrl(cport, &[0, 0, 0, 5, 0], 4), [0, 0, 0, 0]);
    // SHUTDOWN: the process persists and exits.
    let pid = v.pid.unwrap();
    assert_eq!(ctrl(cport, &3u32.to_be_bytes(), 4), [0, 0, 0, 0]);
    assert!(xvtpm_tests::wait_gone(pid, Duration::from_secs(5)), "vtpm-domain did not exit on CMD_SHUTDOWN");
    assert!(s.start_vtpm(&v.uuid).port.is_some());
}

#[test]
fn qemu_style_datafd_over_unix_control_socket() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    let s = Stack::start();
    let ctrl_path = s.dir.path().join("ctrl.sock");
    let listen = format!("ctrl:{}", ctrl_path.display());
    let j = s.xl_json(&["vtpm", "create", "--listen", &listen]);
    assert_eq!(j["state"], "running");
    let c = UnixStream::connect(&ctrl_path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mine, theirs) = UnixStream::pair().unwrap();
    let fds = [theirs.as_raw_fd()];
    let cmd = 0x10u32.to_be_bytes();
    sendmsg::<()>(c.as_raw_fd(), &[std::io::IoSlice::new(&cmd)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
    let mut r = [0u8; 4];
    (&c).read_exact(&mut r).unwrap();
    assert_eq!(r, [0, 0, 0, 0], "CMD_SET_DATAFD refused");
    drop(theirs);
    let mut data = mine;
    data.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    data.write_all(&get_random(16)).unwrap();
    let rsp = read_response(&mut data);
    assert_eq!(rc(&rsp), 0);
    assert_eq!(rsp.len(), 28);
}

#[test]
fn stock_xen_tpmfront_probe_commands_get_tpm12_answers() {
    // Linux drives a stock xen-tpmfront chip as TPM 1.2: timeouts at probe,
    // GetRandom for hwrng. The TPM 2.0 vTPM answers those two in 1.2 form.
    let s = Stack::start();
    let v = s.create_vtpm();
    let port = v.port.unwrap();
    let getcap = tpm_wire::tpm12_get_capability_property(tpm_wire::TPM12_CAP_PROP_TIS_TIMEOUT);
    let r = raw_command(port, &getcap);
    assert_eq!(&r[..2], &[0x00, 0xC4]);
    assert_eq!(rc(&r), 0);
    assert_eq!(u32::from_be_bytes(r[14..18].try_into().unwrap()), 750_000);
    let rnd = tpm_wire::tpm12_get_random(32);
    let r = raw_command(port, &rnd);
    assert_eq!((rc(&r), r.len()), (0, 14 + 32));
    let r2 = raw_command(port, &rnd);
    assert_ne!(r[14..], r2[14..], "two GetRandom answers were equal");
    still_serves(port);
}

#[test]
fn pipelined_commands_in_one_write_are_both_answered() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let mut c = TcpStream::connect(("127.0.0.1", v.port.unwrap())).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut two = get_random(8);
    two.extend_from_slice(&get_random(16));
    c.write_all(&two).unwrap();
    let a = read_response(&mut c);
    let b = read_response(&mut c);
    assert_eq!((rc(&a), a.len()), (0, 20));
    assert_eq!((rc(&b), b.len()), (0, 28));
}
