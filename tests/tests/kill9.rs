//! `kill -9` at random points during a burst of NV-writing commands, 200
//! times: the vTPM always reopens, its EK never changes, and every NV
//! increment it acknowledged is still there (no acknowledged write is lost,
//! none is invented).

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use tpm_wire::nv_counter;
use xvtpm_tests::{Stack, raw_command, rc, read_public, try_read_response};

const NV_INDEX: u32 = 0x0150_0020;

fn nv_define_counter() -> Vec<u8> {
    nv_counter::define(NV_INDEX)
}

fn nv_increment() -> Vec<u8> {
    nv_counter::increment(NV_INDEX)
}

const KILLS: usize = 200;

fn nv_read_counter(port: u16) -> u64 {
    let r = raw_command(port, &nv_counter::read(NV_INDEX));
    assert_eq!(rc(&r), 0, "NV_Read failed: {:#x}", rc(&r));
    nv_counter::value(&r).expect("an NV_Read response carries the value")
}

#[test]
fn kill_dash_nine_never_corrupts_or_regenerates() {
    let s = Stack::start();
    let v = s.create_vtpm();
    let port = v.port.unwrap();
    assert_eq!(rc(&raw_command(port, &nv_define_counter())), 0);
    assert_eq!(rc(&raw_command(port, &nv_increment())), 0);
    let ek = raw_command(port, &read_public(0x8101_0001));
    assert_eq!(rc(&ek), 0);
    let mut counter = nv_read_counter(port);
    let mut handle = v;
    let mut rng = rand::thread_rng();
    let mut in_flight_kills = 0;
    for round in 0..KILLS {
        let port = handle.port.unwrap();
        let pid = handle.pid.unwrap();
        let acked = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let (a, snt) = (acked.clone(), sent.clone());
        let burst = std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return };
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let cmd = nv_increment();
            loop {
                snt.fetch_add(1, Ordering::SeqCst);
                if s.write_all(&cmd).is_err() {
                    return;
                }
                match try_read_response(&mut s) {
                    Ok(r) if rc(&r) == 0 => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        });
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..15_000)));
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        burst.join().unwrap();
        let (acked, sent) = (acked.load(Ordering::SeqCst), sent.load(Ordering::SeqCst));
        if sent > acked {
            in_flight_kills += 1;
        }
        assert!(xvtpm_tests::wait_gone(pid, Duration::from_secs(5)));
        handle = s.start_vtpm(&handle.uuid);
        let p = handle.port.unwrap();
        let now = nv_read_counter(p);
        assert!(
            now >= counter + acked && now <= counter + sent,
            "round {round}: counter {now}, expected {}..={} (acked {acked} of {sent})",
            counter + acked,
            counter + sent
        );
        counter = now;
        assert_eq!(raw_command(p, &read_public(0x8101_0001)), ek, "round {round}: the EK changed");
    }
    assert!(in_flight_kills > KILLS / 2, "only {in_flight_kills} of {KILLS} kills hit a command in flight");
}
