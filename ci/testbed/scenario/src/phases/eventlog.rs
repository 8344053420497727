//! host-eventlog: dom0's measured-boot event log (SeaBIOS measured the boot into QEMU's TPM, the
//! host's "hardware" TPM) checked against the host PCRs of the guest's deep quote
//! (docs/eventlog.md): export → policy → `xl-vtpm verify --event-log … --event-log-policy …` exits
//! 0; the same log with one event digest changed exits 7.

use std::fs;
use std::path::Path;

use super::St;
use crate::cmd::{Cmd, show, show_tail};
use crate::runner::{Cx, Errs, Outcome, check};
use crate::xen;

const SECFS: &str = "/sys/kernel/security";
const BBM: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
const LOG: &str = "/tmp/host-eventlog.bin";
const BAD_LOG: &str = "/tmp/host-eventlog-mutated.bin";
/// The event-log policy written here; attest-service gives it to the tenant.
pub const POLICY: &str = "/tmp/host-eventlog-policy.json";

fn secfs_mounted() -> bool {
    xen::read_text("/proc/mounts")
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(SECFS))
}

/// Why the kernel has no log: the ACPI TPM2 table's log area (LAML at byte 64, LASA at 68; a
/// table without them is 52 or 64 bytes long) and the kernel's TPM lines.
fn why_no_log(cx: &Cx) -> String {
    let t = fs::read("/sys/firmware/acpi/tables/TPM2").unwrap_or_default();
    let u32_at = |o: usize| {
        t.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        t.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let acpi = if t.is_empty() {
        "no /sys/firmware/acpi/tables/TPM2".to_string()
    } else {
        format!(
            "ACPI TPM2 table {} bytes, start method {:?}, LAML {:?}, LASA {:?}",
            t.len(),
            u32_at(48),
            u32_at(64),
            u64_at(68).map(|a| format!("{a:#x}"))
        )
    };
    show(
        "securityfs",
        &Cmd::sh("ls -lR /sys/kernel/security")
            .secs(20)
            .run(cx)
            .all(),
    );
    let dmesg = Cmd::sh("dmesg").secs(20).split().run(cx).stdout;
    let tpm: Vec<&str> = dmesg
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("tpm") || l.contains("tcpa") || l.contains("event log")
        })
        .collect();
    super::show_last("dmesg", &tpm, 30);
    acpi
}

/// Changes one byte of the SHA-256 digest of an event extended into PCR 0–7 whose digest occurs
/// once in the file (so exactly that event changes); returns what was changed.
fn mutate(log: &[u8], events: &serde_json::Value) -> Option<(Vec<u8>, String)> {
    let list = events.get("events")?.as_array()?;
    for ev in list {
        let pcr = ev.get("pcr")?.as_u64()?;
        let ty = ev.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let Some(d) = ev.get("sha256").and_then(|d| d.as_str()) else {
            continue;
        };
        if pcr > 7 || ty.contains("NO_ACTION") {
            continue;
        }
        let Ok(dig) = hex::decode(d) else { continue };
        let at: Vec<usize> = log
            .windows(dig.len())
            .enumerate()
            .filter(|(_, w)| *w == dig.as_slice())
            .map(|(i, _)| i)
            .collect();
        if at.len() != 1 {
            continue;
        }
        let mut out = log.to_vec();
        out[at[0]] ^= 0x01;
        let idx = ev.get("index").map(|i| i.to_string()).unwrap_or_default();
        return Some((
            out,
            format!(
                "event {idx} (PCR {pcr}, {ty}) sha256 {d}: byte at offset {} flipped",
                at[0]
            ),
        ));
    }
    None
}

fn verify_with(cx: &Cx, st: &St, log: &str, save: &str, tag: &str) -> (i32, String) {
    let o = super::verify(
        cx,
        "/tmp/dq.bin",
        &st.dq_nonce,
        &st.vtpm_uuid,
        tag,
        save,
        10,
        &["--event-log", log, "--event-log-policy", POLICY],
    );
    (o.rc, o.all())
}

/// `xl-vtpm ARGS` (its output in `save`, the last 5 lines shown as `[tag]`); Err: why it failed.
fn step(cx: &Cx, args: &[&str], save: &str, tag: &str) -> Result<(), String> {
    let mut argv = vec!["xl-vtpm"];
    argv.extend_from_slice(args);
    let o = Cmd::new(&argv).secs(60).save(save).run(cx);
    show_tail(tag, &o.all(), 5);
    if o.ok() {
        Ok(())
    } else {
        Err(o.failed(&format!("xl-vtpm {}", args[..2].join(" "))))
    }
}

pub fn host_eventlog(cx: &Cx, st: &mut St) -> Outcome {
    let mut e = Errs::default();
    if !secfs_mounted() {
        let o = Cmd::new(&["mount", "-t", "securityfs", "none", SECFS])
            .secs(20)
            .run(cx);
        if !o.ok() {
            return Outcome::fail(format!("mount -t securityfs: {}", o.tail1(3)));
        }
    }
    if !Path::new(BBM).is_file() {
        let why = why_no_log(cx);
        check("dom0", "bios-measurements", false, &why);
        return Outcome::fail(format!("no {BBM} ({why})"));
    }
    if let Err(why) = step(
        cx,
        &["eventlog", "export", "--out", LOG],
        "/tmp/eventlog-export.out",
        "eventlog export",
    ) {
        return Outcome::fail(why);
    }
    let sh = Cmd::new(&["xl-vtpm", "--json", "eventlog", "show", LOG])
        .secs(60)
        .save_split("/tmp/eventlog-show.json", "/tmp/eventlog-show.err")
        .run(cx);
    let Some(events) = xen::parse_json(&sh.stdout) else {
        return Outcome::fail(sh.failed("xl-vtpm --json eventlog show"));
    };
    let n = events
        .get("events")
        .and_then(|v| v.as_array())
        .map_or(0, Vec::len);
    println!(
        "host event log: {n} events, startup locality {}, replays to {}",
        events
            .get("startup_locality")
            .map(|v| v.to_string())
            .unwrap_or_default(),
        events
            .get("replayed_sha256")
            .map(|v| v.to_string())
            .unwrap_or_default()
    );
    if let Err(why) = step(
        cx,
        &[
            "eventlog", "policy", LOG, "--replay", "0-7", "--out", POLICY,
        ],
        "/tmp/eventlog-policy.out",
        "eventlog policy",
    ) {
        return Outcome::fail(why);
    }
    if fs::metadata("/tmp/dq.bin").map(|m| m.len()).unwrap_or(0) == 0
        || st.vtpm_uuid.is_empty()
        || st.dq_nonce.is_empty()
    {
        return Outcome::fail("no deep quote from the guest (vtpm-guest) to check the log against");
    }
    if let Err(t) = super::vtpm::group_ak(cx) {
        return Outcome::fail(format!("xl-vtpm mgr group ak default failed: {t}"));
    }
    let (rc_ok, _) = verify_with(cx, st, LOG, "/tmp/verify-eventlog.out", "verify event log");
    e.check(
        "eventlog-verify",
        rc_ok == 0,
        format!("exit={rc_ok} (want 0: the log replays to the quoted host PCRs 0-7 and the policy allows it)"),
    );
    let raw = fs::read(LOG).unwrap_or_default();
    match mutate(&raw, &events) {
        None => {
            e.check(
                "eventlog-mutated",
                false,
                "no event in PCR 0-7 with a unique digest to change",
            );
        }
        Some((bad, what)) => {
            println!("mutated log: {what}");
            if fs::write(BAD_LOG, &bad).is_err() {
                e.add("write-mutated-log");
            } else {
                let (rc_bad, out) = verify_with(
                    cx,
                    st,
                    BAD_LOG,
                    "/tmp/verify-eventlog-bad.out",
                    "verify mutated log",
                );
                e.check(
                    "eventlog-mutated",
                    rc_bad == 7 && out.contains("event log"),
                    format!("exit={rc_bad} (want 7, naming the host event log)"),
                );
            }
        }
    }
    e.verdict(format!(
        "{n}-event host log: verify with its policy -> 0; one event digest changed -> 7"
    ))
}

#[cfg(test)]
mod tests {
    use super::mutate;

    #[test]
    fn mutates_the_one_event_of_pcr_0_to_7_whose_digest_is_unique() {
        let sep = [0xaa; 32]; // a separator digest, in two events
        let noact = [0xbb; 32];
        let tag = [0xcc; 32];
        let high = [0xdd; 32];
        let mut log = vec![0u8; 8];
        for d in [&noact, &sep, &sep, &high, &tag] {
            log.extend_from_slice(d);
            log.extend_from_slice(&[0; 4]);
        }
        let ev = |i: u32, pcr: u32, ty: &str, d: &[u8; 32]| serde_json::json!({"index": i, "pcr": pcr, "type": ty, "sha256": hex::encode(d)});
        let events = serde_json::json!({"events": [
            ev(0, 0, "EV_NO_ACTION", &noact),
            ev(1, 0, "EV_SEPARATOR", &sep),
            ev(2, 1, "EV_SEPARATOR", &sep),
            ev(3, 8, "EV_IPL", &high),
            ev(4, 1, "EV_EVENT_TAG", &tag),
        ]});
        let (out, what) = mutate(&log, &events).expect("an event to change");
        let at = 8 + 4 * 36;
        assert_eq!(out[at], 0xcd, "{what}");
        let changed: Vec<usize> = (0..log.len()).filter(|&i| log[i] != out[i]).collect();
        assert_eq!(changed, [at]);
        assert!(what.contains("event 4 (PCR 1, EV_EVENT_TAG)"), "{what}");
        // nothing unique in PCR 0-7: no mutation
        let only = serde_json::json!({"events": [ev(1, 0, "EV_SEPARATOR", &sep), ev(3, 8, "EV_IPL", &high)]});
        assert!(mutate(&log, &only).is_none());
    }
}
