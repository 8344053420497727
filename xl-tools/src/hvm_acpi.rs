//! ACPI tables that describe a CRB TPM 2.0 to an HVM guest (`vtpm = [ "model=crb" ]`).
//!
//! Xen 4.17's hvmloader builds TPM tables only for a TIS TPM it finds at 0xFED40000 (a `TCPA`
//! table and a `PNP0C31` device). A guest finds a CRB TPM — the interface Windows prefers and
//! Linux's `tpm_crb` drives — only through a `TPM2` table (start method "command response
//! buffer", the address of the control area) and an ACPI device with `_HID` `MSFT0101` whose
//! `_CRS` covers the CRB registers. hvmloader appends extra tables from xl.cfg's
//! `acpi_firmware` file (tables concatenated, each self-describing its length; tables it builds
//! itself cannot be replaced); `xl-vtpm create` writes these two there.
//!
//! The addresses are QEMU's `tpm-crb` device's: registers at 0xFED40000 (0x1000 bytes), the
//! control area at offset 0x40, the command/response buffer after it (QEMU's
//! `TPM_CRB_ADDR_BASE`, `A_CRB_CTRL_REQ`). hvmloader sees no TIS there (the TIS vendor register
//! at 0xFED40F00 lies in the CRB buffer, which reads as zero), so it adds no TIS device beside
//! ours.

/// The CRB TPM's register block (QEMU `tpm-crb`).
pub const CRB_BASE: u32 = 0xFED4_0000;
/// Its size.
pub const CRB_SIZE: u32 = 0x1000;
/// The CRB control area (`TPM_CRB_ADDR_CTRL`: base + `A_CRB_CTRL_REQ`).
pub const CRB_CONTROL_AREA: u64 = CRB_BASE as u64 + 0x40;
/// TCG ACPI spec: start method "Command Response Buffer".
pub const START_METHOD_CRB: u32 = 7;

const OEM_ID: &[u8; 6] = b"XVTPM ";
const CREATOR: &[u8; 4] = b"XVTP";

/// An ACPI table: the standard 36-byte header (`signature`, length, `revision`, checksum, OEM
/// and creator ids) followed by `body`, with the checksum making all bytes sum to zero.
fn table(signature: &[u8; 4], revision: u8, table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(36 + body.len()).expect("ACPI tables here are small");
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(table_id);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

/// The `TPM2` table (TCG ACPI Specification, revision 4, client platform) for a CRB TPM.
/// No event-log area: the firmware (SeaBIOS under Xen) does not measure into this TPM.
pub fn tpm2_table() -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&0u16.to_le_bytes()); // platform class: client
    b.extend_from_slice(&0u16.to_le_bytes()); // reserved
    b.extend_from_slice(&CRB_CONTROL_AREA.to_le_bytes());
    b.extend_from_slice(&START_METHOD_CRB.to_le_bytes());
    b.extend_from_slice(&[0; 12]); // start-method specific parameters: none for CRB
    b.extend_from_slice(&0u32.to_le_bytes()); // log area minimum length
    b.extend_from_slice(&0u64.to_le_bytes()); // log area start address
    table(b"TPM2", 4, b"XVTPMCRB", &b)
}

/// AML PkgLength of a package whose contents (after the PkgLength) are `inner` bytes.
fn pkg_length(inner: usize) -> Vec<u8> {
    // One byte holds up to 63 (the length counts the PkgLength bytes themselves); two bytes
    // up to 4095, which is all an SSDT of this size needs.
    if inner + 1 < 0x40 {
        return vec![(inner + 1) as u8];
    }
    let total = inner + 2;
    assert!(total < 0x1000, "AML package too large for a two-byte PkgLength");
    vec![0x40 | (total & 0x0F) as u8, (total >> 4) as u8]
}

/// `OP PkgLength contents` (Scope, Device, Buffer).
fn package(op: &[u8], contents: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(contents.len()));
    v.extend_from_slice(contents);
    v
}

/// `Name(NAME, value)`.
fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08]; // NameOp
    v.extend_from_slice(seg);
    v.extend_from_slice(value);
    v
}

/// An `SSDT` with `Scope (\_SB) { Device (VTPM) { _HID "MSFT0101", _CRS
/// Memory32Fixed (ReadWrite, CRB_BASE, CRB_SIZE) } }`: the TPM 2.0 device Linux's `tpm_crb`
/// and Windows bind to (no `_STA`: present and enabled).
pub fn ssdt() -> Vec<u8> {
    let mut string = vec![0x0D]; // StringPrefix
    string.extend_from_slice(b"MSFT0101\0");
    let mut crs = vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed, length 9, read-write
    crs.extend_from_slice(&CRB_BASE.to_le_bytes());
    crs.extend_from_slice(&CRB_SIZE.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0x00]); // EndTag (checksum 0: not checked)
    let mut buffer_body = vec![0x0A, crs.len() as u8]; // BufferSize: ByteConst
    buffer_body.extend_from_slice(&crs);
    let mut device = b"VTPM".to_vec();
    device.extend(name(b"_HID", &string));
    device.extend(name(b"_CRS", &package(&[0x11], &buffer_body))); // BufferOp
    let mut scope = b"\\_SB_".to_vec();
    scope.extend(package(&[0x5B, 0x82], &device)); // DeviceOp
    table(b"SSDT", 2, b"XVTPMCRB", &package(&[0x10], &scope)) // ScopeOp
}

/// The tables `acpi_firmware` carries for a CRB TPM: the `TPM2` table, then the `SSDT`.
pub fn crb_tables() -> Vec<u8> {
    let mut v = tpm2_table();
    v.extend(ssdt());
    v
}

/// Splits an `acpi_firmware` file into its tables, checking each header's length and
/// checksum (hvmloader would skip or misplace a table that is not well formed). Returns each
/// table's signature.
pub fn table_signatures(mut bytes: &[u8]) -> Result<Vec<[u8; 4]>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 36 {
            return Err(format!("{} trailing bytes are not an ACPI table (a header is 36 bytes)", bytes.len()));
        }
        let sig: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        if len < 36 || len > bytes.len() {
            return Err(format!("table {:?} says it is {len} bytes long; {} remain", String::from_utf8_lossy(&sig), bytes.len()));
        }
        if bytes[..len].iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
            return Err(format!("table {:?}: bad checksum", String::from_utf8_lossy(&sig)));
        }
        out.push(sig);
        bytes = &bytes[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_well_formed_and_self_describing() {
        let all = crb_tables();
        assert_eq!(table_signatures(&all).unwrap(), vec![*b"TPM2", *b"SSDT"]);
        let t = tpm2_table();
        assert_eq!(t.len(), 76, "TPM2 revision 4 with the log area fields");
        assert_eq!(&t[40..48], &0xFED4_0040u64.to_le_bytes());
        assert_eq!(&t[48..52], &7u32.to_le_bytes());
        let mut broken = all.clone();
        broken[20] ^= 1;
        assert!(table_signatures(&broken).unwrap_err().contains("TPM2"));
        assert!(table_signatures(&all[..50]).is_err());
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 bytes of contents + 2 PkgLength bytes = 65 = 0x41.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
    }
}
