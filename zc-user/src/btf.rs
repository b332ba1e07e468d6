//! Member offsets of kernel structs, read from the running kernel's BTF
//! (/sys/kernel/btf/vmlinux), so an eBPF program can follow a pointer
//! without being compiled against this kernel's layout.
use std::collections::HashMap;

use anyhow::{Context as _, Result, bail};

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// Byte offsets of named members of named structs.
pub struct Offsets {
    found: HashMap<(String, String), u32>,
}

impl Offsets {
    /// Reads the running kernel's BTF and keeps the offsets of `wanted`
    /// (struct, member) pairs; members directly in the struct only.
    pub fn of_running_kernel(wanted: &[(&str, &str)]) -> Result<Self> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")
            .context("reading /sys/kernel/btf/vmlinux (kernel built without BTF?)")?;
        Self::parse(&data, wanted)
    }

    pub fn get(&self, strukt: &str, member: &str) -> Result<u32> {
        self.found
            .get(&(strukt.to_string(), member.to_string()))
            .copied()
            .with_context(|| format!("the kernel's BTF has no member {member} in struct {strukt}"))
    }

    fn parse(data: &[u8], wanted: &[(&str, &str)]) -> Result<Self> {
        let u16_at = |o: usize| -> Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(o..o + 2).context("BTF truncated")?.try_into()?,
            ))
        };
        let u32_at = |o: usize| -> Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(o..o + 4).context("BTF truncated")?.try_into()?,
            ))
        };
        if u16_at(0)? != MAGIC {
            bail!("not BTF (or not little-endian)");
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let str_off = u32_at(16)? as usize;
        let types = hdr_len + type_off;
        let strings = hdr_len + str_off;
        let name = |off: u32| -> &str {
            let start = strings + off as usize;
            let rest = data.get(start..).unwrap_or_default();
            let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
            std::str::from_utf8(&rest[..end]).unwrap_or("")
        };
        let mut found = HashMap::new();
        let mut at = types;
        while at < types + type_len {
            let name_off = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => 0,
            };
            if kind == KIND_STRUCT {
                let sname = name(name_off);
                if wanted.iter().any(|(s, _)| *s == sname) {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let mname = name(u32_at(m)?);
                        let raw = u32_at(m + 8)?;
                        // With kflag the low 24 bits are the bit offset.
                        let bits = if kflag { raw & 0x00ff_ffff } else { raw };
                        if wanted.iter().any(|(s, mm)| *s == sname && *mm == mname) {
                            found.insert((sname.to_string(), mname.to_string()), bits / 8);
                        }
                    }
                }
            }
            at += extra;
        }
        Ok(Self { found })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_socket_sk_and_the_cookie_in_the_running_kernel() {
        let o = Offsets::of_running_kernel(&[("socket", "sk"), ("sock_common", "skc_cookie")])
            .expect("BTF");
        // struct socket starts with state, type, flags, file: sk follows.
        let sk = o.get("socket", "sk").expect("socket.sk");
        assert!(sk >= 16 && sk.is_multiple_of(8), "implausible offset {sk}");
        let cookie = o.get("sock_common", "skc_cookie").expect("skc_cookie");
        assert!(
            cookie > 16 && cookie.is_multiple_of(8),
            "implausible offset {cookie}"
        );
        assert!(o.get("socket", "no_such_member").is_err());
    }
}
