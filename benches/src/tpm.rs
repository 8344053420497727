//! Raw TPM 2.0 commands and a blocking client for one persistent connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tpm_wire::{Command, TPM2_ST_NO_SESSIONS, TPM2_ST_SESSIONS};


pub use tpm_wire::{tpm2_get_random as get_random, tpm2_pcr_extend as pcr_extend};

/// `TPM2_CreatePrimary(TPM_RH_ENDORSEMENT, template)`.
pub fn create_primary_ek(template: &[u8]) -> Vec<u8> {
    Command::new(TPM2_ST_SESSIONS, tpm_wire::TPM2_CC_CREATE_PRIMARY)
        .u32(tpm_wire::TPM2_RH_ENDORSEMENT)
        .password_session()
        .tpm2b(&[0, 0, 0, 0])
        .tpm2b(template)
        .tpm2b(&[])
        .u32(0)
        .finish()
}

/// `TPM2_EvictControl(owner, handle → persistent)`.
pub fn evict_control(handle: u32, persistent: u32) -> Vec<u8> {
    Command::new(TPM2_ST_SESSIONS, tpm_wire::TPM2_CC_EVICT_CONTROL)
        .u32(tpm_wire::TPM2_RH_OWNER)
        .u32(handle)
        .password_session()
        .u32(persistent)
        .finish()
}

/// `TPM2_FlushContext(handle)`.
pub fn flush(handle: u32) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, tpm_wire::TPM2_CC_FLUSH_CONTEXT)
        .u32(handle)
        .finish()
}

/// The response code of a response.
pub fn rc(rsp: &[u8]) -> u32 {
    tpm_wire::response_code(rsp).unwrap_or(u32::MAX)
}

/// The object handle of a CreatePrimary response.
pub fn object_handle(rsp: &[u8]) -> u32 {
    rsp.get(10..14)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// A byte stream (TCP or Unix).
pub trait Stream: Read + Write {}
impl Stream for TcpStream {}
impl Stream for UnixStream {}

/// One persistent data connection (swtpm socket protocol: raw TPM packets).
pub struct Conn {
    s: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Conn {
    /// Wraps a connected TCP stream.
    pub fn new(s: TcpStream) -> Conn {
        Conn {
            s: Box::new(s),
            buf: Vec::with_capacity(4096),
        }
    }

    /// Connects to a Unix data socket, retrying until `timeout`.
    pub fn unix(path: &Path, timeout: Duration) -> Result<Conn> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    return Ok(Conn {
                        s: Box::new(s),
                        buf: Vec::with_capacity(4096),
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!("{} did not answer: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Sends one command, reads one response, returns its response code.
    pub fn xfer(&mut self, cmd: &[u8]) -> Result<u32> {
        self.s.write_all(cmd)?;
        self.buf.resize(10, 0);
        self.s.read_exact(&mut self.buf[..10])?;
        let size =
            u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
        if !(10..=8192).contains(&size) {
            bail!("bad response size {size}");
        }
        self.buf.resize(size, 0);
        self.s.read_exact(&mut self.buf[10..])?;
        Ok(rc(&self.buf))
    }
}
