//! Address blocks (`10.0.0.0/8`, `fd00::/8`): what `ferry init` intercepts and what the mesh's address ranges are.

use std::fmt;
use std::net::IpAddr;

/// An address block such as `10.0.0.0/8` or `fd00::/8` (a bare address is a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block (an IPv4 address is never inside an IPv6 block, nor the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, true),
            IpAddr::V6(v6) => (u128::from(v6), false),
        };
        let ((block, v4), (candidate, candidate_v4)) = (bits(self.addr), bits(ip));
        if v4 != candidate_v4 {
            return false;
        }
        // An IPv4 block's prefix counts from the top of the 32 bits placed at the top of the 128.
        let prefix = u32::from(self.prefix);
        let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
        block & mask == candidate & mask
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix must be 0-{max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_contain_their_addresses() {
        let cases = [
            ("10.96.0.0/12", "10.96.0.10", true),
            ("10.96.0.0/12", "10.111.255.255", true),
            ("10.96.0.0/12", "10.112.0.0", false),
            ("10.0.0.7", "10.0.0.7", true),
            ("10.0.0.7", "10.0.0.8", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "10.0.0.1", false),
        ];
        for (block, ip, inside) in cases {
            let cidr: Cidr = block.parse().unwrap();
            assert_eq!(cidr.contains(ip.parse().unwrap()), inside, "{block} {ip}");
        }
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().contains("prefix must be 0-32"));
        assert!("nope/8".parse::<Cidr>().is_err());
    }
}
