//! Network policy of a run.
//!
//! Deno gets `--allow-net` with `--deny-net` over every loopback, private,
//! link-local, multicast and metadata range; Deno checks a host name's
//! resolved addresses against those ranges, so DNS rebinding does not get
//! around it. The API (and any address opened with `--egress-allow`) is
//! reached through a Unix socket of the run's own, which the supervisor
//! pipes to the real address: the sandbox never needs a loopback hole.

use std::path::Path;

use tokio::net::{TcpStream, UnixListener};
use tokio::task::JoinSet;

/// Ranges a run may never reach. Deno 2.9 takes IPv4 CIDR ranges but only
/// single IPv6 addresses, so Deno's list holds IPv6 loopback and
/// unspecified, and [`denied_addresses`] adds this host's own IPv6
/// addresses one by one; the bootstrap refuses every private, link-local
/// and IPv4-mapped IPv6 range by resolving and checking before it connects.
/// IPv4-mapped IPv6 addresses are normalised by Deno and caught by the IPv4
/// ranges.
pub const DENIED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "[::1]",
    "[::]",
];

/// Deno's `--deny-net` list: the fixed ranges plus every IPv6 address of
/// this host (`/proc/net/if_inet6`), so a service listening on the host's
/// own ULA or link-local address is out of reach whatever a val resolves.
pub fn denied_addresses() -> Vec<String> {
    let mut denied: Vec<String> = DENIED_RANGES.iter().map(|r| (*r).to_owned()).collect();
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in text.lines() {
            let Some(hex) = line.split_whitespace().next().filter(|h| h.len() == 32) else {
                continue;
            };
            let Ok(bits) = u128::from_str_radix(hex, 16) else {
                continue;
            };
            let addr = std::net::Ipv6Addr::from(bits);
            let entry = format!("[{addr}]");
            if !denied.contains(&entry) {
                denied.push(entry);
            }
        }
    }
    denied
}

/// One address opened for runs, for tests and local development:
/// `--egress-allow 127.0.0.1:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllow {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for EgressAllow {
    type Err = String;

    fn from_str(s: &str) -> Result<EgressAllow, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("invalid egress address '{s}': use HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("invalid port in egress address '{s}'"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("invalid egress address '{s}': no host"));
        }
        Ok(EgressAllow {
            host: host.to_owned(),
            port,
        })
    }
}

impl EgressAllow {
    /// The origin a val fetches (`http://127.0.0.1:8080`).
    pub fn origin(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

/// Listens on `socket` and pipes every connection to `target`, until the
/// returned tasks are dropped (the run's end).
pub fn pipe(socket: &Path, target: EgressAllow, tasks: &mut JoinSet<()>) -> std::io::Result<()> {
    let listener = UnixListener::bind(socket)?;
    tasks.spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                break;
            };
            let target = target.clone();
            connections.spawn(async move {
                let outbound = TcpStream::connect((target.host.as_str(), target.port)).await;
                match outbound {
                    Ok(mut outbound) => {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "egress pipe could not connect"),
                }
            });
            // Reap finished connections so a long run does not accumulate them.
            while connections.try_join_next().is_some() {}
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_egress_addresses() {
        let a: EgressAllow = "127.0.0.1:8080".parse().expect("valid");
        assert_eq!(a.origin(), "http://127.0.0.1:8080");
        let b: EgressAllow = "[::1]:80".parse().expect("valid");
        assert_eq!(b.origin(), "http://[::1]:80");
        assert!("nope".parse::<EgressAllow>().is_err());
        assert!(":80".parse::<EgressAllow>().is_err());
    }
}
