//! Verifiable byte streams, shared by `zc demo`, the bench and the tests:
//! a sender writes a reproducible pseudo-random stream and keeps its
//! digest; a sink reads to EOF and reports count and digest.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
};

use xxhash_rust::xxh3::Xxh3;

/// Byte count and xxh3 digest of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub hash: u64,
}

impl Digest {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.bytes.to_be_bytes());
        b[8..].copy_from_slice(&self.hash.to_be_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 16]) -> Self {
        let mut n = [0u8; 8];
        n.copy_from_slice(&b[..8]);
        let mut h = [0u8; 8];
        h.copy_from_slice(&b[8..]);
        Self {
            bytes: u64::from_be_bytes(n),
            hash: u64::from_be_bytes(h),
        }
    }
}

/// A reproducible source of bytes: a 1 MiB block of xorshift output
/// walked with a stride, so consecutive writes differ and a reordering or
/// duplication changes the digest.
pub struct Pattern {
    block: Vec<u8>,
    pos: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        let mut x = seed | 1;
        let mut block = vec![0u8; 1 << 20];
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        Self { block, pos: 0 }
    }

    /// The next `len` bytes of the stream (at most the block size).
    pub fn next(&mut self, len: usize) -> &[u8] {
        let len = len.min(self.block.len());
        if self.pos + len > self.block.len() {
            // Restart at an odd offset so the stream does not repeat with
            // the block's period.
            self.pos = (self.pos * 7 + 13) % (self.block.len() - len).max(1);
        }
        let s = &self.block[self.pos..self.pos + len];
        self.pos += len;
        s
    }
}

/// Writes `total` bytes in writes of `write_size`, then shuts the write
/// side; returns the digest of what was sent.
pub fn send(
    stream: &mut TcpStream,
    total: u64,
    write_size: usize,
    seed: u64,
) -> io::Result<Digest> {
    let mut pattern = Pattern::new(seed);
    let mut h = Xxh3::new();
    let mut left = total;
    while left > 0 {
        let n = (write_size as u64).min(left) as usize;
        let buf = pattern.next(n);
        stream.write_all(buf)?;
        h.update(buf);
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(Digest {
        bytes: total,
        hash: h.digest(),
    })
}

/// Reads to EOF; returns count and digest of what arrived.
pub fn sink(stream: &mut impl Read) -> io::Result<Digest> {
    let mut buf = vec![0u8; 256 << 10];
    let mut h = Xxh3::new();
    let mut bytes = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Digest {
        bytes,
        hash: h.digest(),
    })
}
