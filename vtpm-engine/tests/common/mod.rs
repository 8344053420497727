//! Shared TPM 2.0 command helpers for the engine integration tests.
//!
//! libtpms holds one TPM per process, so every test file is its own binary (process) and
//! contains exactly one `#[test]` scenario.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use vtpm_engine::Engine;
use tpm_wire::{Command, TPM2_ALG_SHA256, TPM2_CC_NV_DEFINE_SPACE, TPM2_CC_NV_READ, TPM2_CC_NV_WRITE, TPM2_RH_OWNER, TPM2_ST_SESSIONS};

pub const NV_INDEX: u32 = 0x0150_0000;

pub fn rc(resp: &[u8]) -> u32 {
    tpm_wire::response_code(resp).expect("response shorter than a header")
}

pub fn ok(engine: &mut Engine, cmd: &[u8]) -> Vec<u8> {
    let resp = engine.process(cmd);
    assert_eq!(rc(&resp), 0, "command {:02x?} failed", &cmd[6..10]);
    assert_eq!(
        u32::from_be_bytes(resp[2..6].try_into().unwrap()) as usize,
        resp.len()
    );
    resp
}

pub fn startup_clear(engine: &mut Engine) {
    ok(engine, &tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR));
}

pub fn get_random(engine: &mut Engine, n: u16) -> Vec<u8> {
    let resp = ok(engine, &tpm_wire::tpm2_get_random(n));
    let len = u16::from_be_bytes([resp[10], resp[11]]) as usize;
    assert_eq!(len, n as usize);
    resp[12..12 + len].to_vec()
}

pub fn pcr_extend(engine: &mut Engine, pcr: u32, digest: &[u8; 32]) {
    ok(engine, &tpm_wire::tpm2_pcr_extend(pcr, digest));
}

pub fn pcr_read(engine: &mut Engine, pcr: u32) -> [u8; 32] {
    let mut select = [0u8; 3];
    select[(pcr / 8) as usize] |= 1 << (pcr % 8);
    let resp = ok(engine, &tpm_wire::tpm2_pcr_read_bitmap(tpm_wire::TPM2_ALG_SHA256, select));
    // header(10) updateCounter(4) selection(4+2+1+3) count(4) size(2) digest(32)
    assert_eq!(u32::from_be_bytes(resp[24..28].try_into().unwrap()), 1);
    assert_eq!(u16::from_be_bytes([resp[28], resp[29]]), 32);
    resp[30..62].try_into().unwrap()
}

pub fn extended(old: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(digest);
    h.finalize().into()
}

pub fn nv_define(engine: &mut Engine, index: u32, size: u16) {
    let public = Command::new(0, 0) // borrow the builder for the TPMS_NV_PUBLIC body
        .u32(index)
        .u16(TPM2_ALG_SHA256)
        .u32(0x0006_0006) // OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD
        .u16(0)
        .u16(size)
        .finish()[10..]
        .to_vec();
    let cmd = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_DEFINE_SPACE)
        .u32(TPM2_RH_OWNER)
        .password_session()
        .tpm2b(&[])
        .tpm2b(&public)
        .finish();
    ok(engine, &cmd);
}

pub fn nv_write(engine: &mut Engine, index: u32, data: &[u8]) {
    let cmd = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_WRITE)
        .u32(TPM2_RH_OWNER)
        .u32(index)
        .password_session()
        .tpm2b(data)
        .u16(0)
        .finish();
    ok(engine, &cmd);
}

pub fn nv_read(engine: &mut Engine, index: u32, size: u16) -> Vec<u8> {
    let cmd = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_READ)
        .u32(TPM2_RH_OWNER)
        .u32(index)
        .password_session()
        .u16(size)
        .u16(0)
        .finish();
    let resp = ok(engine, &cmd);
    let len = u16::from_be_bytes([resp[14], resp[15]]) as usize;
    resp[16..16 + len].to_vec()
}
