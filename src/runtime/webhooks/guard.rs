//! Where a webhook may be sent: not to this machine, its private network or
//! link-local addresses (a cloud's metadata service), unless the operator
//! allows it (`--webhook-allow-private`). Checked when a webhook is made
//! and again at every connection, by the resolver itself, so a name that
//! later resolves elsewhere (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is a public address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

/// The IPv4 address an IPv6 one carries to reach it: mapped
/// (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) or
/// 6to4 (`2002:aabb:ccdd::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Carrier-grade NAT, 100.64.0.0/10; IETF protocol assignments, 192.0.0.0/24.
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        // Benchmarking, 198.18.0.0/15; reserved, 240.0.0.0/4.
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local, fc00::/7; link-local, fe80::/10.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        // Site-local (deprecated), fec0::/10; local-use NAT64, 64:ff9b:1::/48.
        || (first & 0xffc0) == 0xfec0
        || (first == 0x64 && ip.segments()[1] == 0xff9b)
        // Teredo, 2001::/32 (it tunnels to any IPv4); documentation, 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// Why a target is refused, if it is.
pub fn refuse(ip: IpAddr, allow_private: bool) -> Option<String> {
    (!allow_private && !is_public(ip))
        .then(|| format!("{ip} is not a public address (see --webhook-allow-private)"))
}

/// Resolves names as the system does, keeping only the addresses
/// [`refuse`] lets through.
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| refuse(a.ip(), allow_private).is_none())
                .collect();
            if kept.is_empty() {
                let why = found
                    .first()
                    .and_then(|a| refuse(a.ip(), allow_private))
                    .unwrap_or_else(|| format!("{host} has no address"));
                return Err(why.into());
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// The client webhooks are sent with: the guarded resolver, no redirects,
/// short timeouts.
pub fn client(allow_private: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .redirect(reqwest::redirect::Policy::none())
        // A proxy (HTTP_PROXY …) would resolve the target itself, past the
        // resolver above.
        .no_proxy()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .user_agent(concat!("loopd-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the webhook client builds")
}

/// Checks a webhook's URL when it is made: http or https, a host, and every
/// address it names or resolves to allowed. Returns the URL as parsed.
pub async fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`url` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("`url` must be http:// or https://".into());
    }
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => {
            return refuse(ip.into(), allow_private).map_or(Ok(parsed), Err);
        }
        Some(url::Host::Ipv6(ip)) => {
            return refuse(ip.into(), allow_private).map_or(Ok(parsed), Err);
        }
        None => return Err("`url` has no host".into()),
    };
    let port = parsed.port_or_known_default().unwrap_or(443);
    let lookup = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("{host} did not resolve in time"))?
    .map_err(|e| format!("{host} does not resolve: {e}"))?;
    for addr in lookup {
        if refuse(addr.ip(), allow_private).is_some() {
            // Not which address: internal names stay unknown to users.
            return Err(format!(
                "{host} resolves to an address that is not public (see --webhook-allow-private)"
            ));
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_addresses_are_public() {
        let table: &[(&str, bool)] = &[
            ("8.8.8.8", true),
            ("1.1.1.1", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("172.32.0.1", true),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("100.64.0.1", false),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
            ("224.0.0.1", false),
            ("::1", false),
            ("::", false),
            ("fe80::1", false),
            ("fd00::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("2606:4700:4700::1111", true),
            ("2001:db8::1", false),
            ("64:ff9b::a00:1", false),
            ("64:ff9b::808:808", true),
            ("2002:a00:1::1", false),
            ("2002:808:808::1", true),
            ("::10.0.0.1", false),
            ("2001:0:4136:e378::1", false),
            ("fec0::1", false),
            ("192.0.0.8", false),
        ];
        for (ip, public) in table {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(is_public(ip), *public, "{ip}");
            assert_eq!(refuse(ip, true), None, "allowed: {ip}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_before_a_webhook_is_made() {
        for (url, ok) in [
            ("http://127.0.0.1:9/hook", false),
            ("http://[::1]/hook", false),
            ("http://169.254.169.254/latest/meta-data", false),
            ("http://localhost/hook", false),
            ("ftp://example.com/", false),
            ("not a url", false),
            ("https://8.8.8.8/hook", true),
        ] {
            assert_eq!(check_url(url, false).await.is_ok(), ok, "{url}");
        }
        assert!(check_url("http://127.0.0.1:9/hook", true).await.is_ok());
    }
}
