//! Manager restarts keep every vTPM openable; a host whose PCRs moved makes
//! the manager refuse to start (its master secret does not unseal).

use xvtpm_tests::{Stack, raw_command, rc, read_public};

#[test]
fn every_vtpm_reopens_after_a_manager_restart() {
    let mut s = Stack::start();
    let vs: Vec<_> = (0..3).map(|_| s.create_vtpm()).collect();
    let eks: Vec<_> = vs.iter().map(|v| raw_command(v.port.unwrap(), &read_public(0x8101_0001))).collect();
    for v in &vs {
        s.stop_vtpm(&v.uuid);
    }
    s.stop_manager();
    s.start_manager();
    for (v, ek) in vs.iter().zip(&eks) {
        let v2 = s.start_vtpm(&v.uuid);
        let now = raw_command(v2.port.unwrap(), &read_public(0x8101_0001));
        assert_eq!(rc(&now), 0);
        assert_eq!(&now, ek, "EK of {} changed", v.uuid);
    }
    // And the physical TPM restarting (PCRs reset to the provisioned values) too.
    for v in &vs {
        s.stop_vtpm(&v.uuid);
    }
    s.stop_manager();
    s.swtpm.restart();
    s.start_manager();
    assert!(s.start_vtpm(&vs[0].uuid).port.is_some());
}

#[test]
fn manager_refuses_to_start_when_host_pcrs_changed() {
    let mut s = Stack::start();
    let v = s.create_vtpm();
    s.stop_vtpm(&v.uuid);
    s.stop_manager();
    // Extend PCR 5 of the physical TPM (sealed set is 0-7).
    let t = s.swtpm.tcti();
    xvtpm_tests::tpm2(&t, &["tpm2_pcrextend", "5:sha256=0000000000000000000000000000000000000000000000000000000000000005"]);
    assert!(!s.try_start_manager(), "manager started although PCR 5 moved");
    let log = s.mgr_log();
    assert!(log.contains("cannot unseal the master secret") && log.contains("reauthorize"), "{log}");
}

#[test]
fn running_vtpms_stay_attached_across_a_manager_restart() {
    use vtpm_proto::deepquote_cmd::DeepQuoteCommand;
    let mut s = Stack::start();
    let v = s.create_vtpm();
    s.stop_manager();
    s.start_manager();
    // The running vTPM's deep quote needs the manager to know its process. While the manager
    // comes back the vTPM answers TPM_RC_RETRY (the manager unreachable or busy), as a TPM does
    // when the caller should try again (the kernel's TPM driver and the TSS retry it): a client
    // gets its quote within seconds, and no other answer comes before it. (One CI run of
    // 2026-12-05 got one RETRY on the first attempt, under load.)
    let cmd = DeepQuoteCommand { nonce: vec![1; 16], vpcr_alg: 0x000B, vpcrs: vec![0], host_pcrs: vec![0], flags: 0 };
    let mut retries = 0;
    let r = loop {
        let r = raw_command(v.port.unwrap(), &cmd.encode());
        if rc(&r) != tpm_wire::TPM2_RC_RETRY || retries == 50 {
            break r;
        }
        retries += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(rc(&r), 0, "deep quote after manager restart, after {retries} TPM_RC_RETRY: {:#x}\n{}", rc(&r), s.mgr_log());
    assert!(s.mgr_log().contains("re-attached running vTPM processes"));
}
