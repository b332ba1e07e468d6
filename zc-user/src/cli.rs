//! Parsers for command-line values that people write in more than one
//! way: sizes with units, listen addresses without a host, upstreams by
//! name.
use std::net::{SocketAddr, ToSocketAddrs};

/// A byte count: a number with an optional unit, binary multiples either
/// way they are spelled: `4096`, `64k`, `64K`, `64KiB`, `16m`, `16MB`,
/// `1g`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{s}` is not a size like 4096, 64k, 16MiB or 1g")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 4096, 64k, 16MiB or 1g"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// [`parse_size`] for buffer sizes held in a `usize`.
pub fn parse_size_usize(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    usize::try_from(n).map_err(|_| format!("`{s}` is too large"))
}

/// A duration: a number of seconds, or a number with a unit: `1.5`,
/// `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a duration like 500ms, 30s, 5m or 1h");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Where to accept clients: `HOST:PORT`, `[V6]:PORT`, or `:PORT` for
/// every IPv4 address of the host.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let full = match t.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => t.to_string(),
    };
    resolve(&full).map_err(|e| format!("`{s}`: {e} (write 127.0.0.1:8080, [::]:8080 or :8080)"))
}

/// The server to connect clients to: an address or `NAME:PORT`, the name
/// resolved once, when the relay starts (its first address is used).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    resolve(s.trim()).map_err(|e| format!("`{s}`: {e} (write 10.0.0.9:80 or localhost:80)"))
}

fn resolve(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err("no port".into());
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve it: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| "the name has no address".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units_spelled_either_way() {
        for (s, n) in [
            ("4096", 4096),
            ("64k", 64 << 10),
            ("64K", 64 << 10),
            ("64KiB", 64 << 10),
            ("16m", 16 << 20),
            ("16MB", 16 << 20),
            ("16 MiB", 16 << 20),
            ("1g", 1 << 30),
            ("0", 0),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in ["", "k", "4x", "1.5m", "-1", "99999999999999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn durations_take_units() {
        use std::time::Duration;
        for (s, d) in [
            ("1", Duration::from_secs(1)),
            ("1.5", Duration::from_millis(1500)),
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["", "s", "1x", "-1", "1.2.3"] {
            assert!(parse_duration(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn listen_without_a_host_means_every_ipv4_address() {
        assert_eq!(
            parse_listen(":8080"),
            "0.0.0.0:8080".parse().map_err(|_| String::new())
        );
        assert_eq!(
            parse_listen("[::]:80"),
            "[::]:80".parse().map_err(|_| String::new())
        );
        assert!(parse_listen("8080").is_err());
    }

    #[test]
    fn upstreams_may_be_names() {
        let a = parse_upstream("localhost:80").expect("localhost resolves");
        assert!(a.ip().is_loopback() && a.port() == 80, "{a}");
        assert!(parse_upstream("localhost").is_err());
    }
}
