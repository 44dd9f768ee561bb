//! Where a webhook may be sent: http(s) URLs whose host is, and resolves to,
//! public addresses only (unless `allow_private`).
//!
//! Checked three times: the literal host and its DNS answers when an endpoint
//! is created or changed ([`check_url`]); the literal host before each attempt
//! ([`check_literal`]); and every DNS answer the HTTP client uses, through
//! [`GuardResolver`], which drops non-public addresses. The last one is what
//! defeats DNS rebinding: the address that is checked is the address that is
//! connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::error::ResultExt as _;
use url::{Host, Url};

use super::WebhookConfig;

/// A destination we refuse, with a message fit for the API caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `ip` is a public unicast address (not private, loopback,
/// link-local, unspecified, multicast, broadcast, shared, reserved or
/// documentation space; IPv6 forms that embed an IPv4 address are judged by
/// that address).
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // shared address space (CGNAT), 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking, 198.18/15
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let seg = ip.segments();
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed an IPv4 address.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        ));
    }
    if seg[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        ));
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || seg[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated) and ::/96
}

/// Parses an endpoint URL: http or https, with a host, no fragment.
pub(crate) fn parse_url(raw: &str) -> Result<Url, Refused> {
    let url = Url::parse(raw.trim()).map_err(|e| Refused(format!("invalid url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused("url must be http or https".into()));
    }
    if url.host().is_none() {
        return Err(Refused("url must have a host".into()));
    }
    Ok(url)
}

fn refused_private() -> Refused {
    Refused(
        "url points at a private, loopback, link-local, unspecified or multicast address".into(),
    )
}

/// The check before each attempt: a literal IP host must be public (names
/// are checked by [`GuardResolver`] as they are resolved).
pub(crate) fn check_literal(url: &Url, allow_private: bool) -> Result<(), Refused> {
    if allow_private {
        return Ok(());
    }
    match url.host() {
        Some(Host::Ipv4(ip)) if !is_public_v4(ip) => Err(refused_private()),
        Some(Host::Ipv6(ip)) if !is_public_v6(ip) => Err(refused_private()),
        Some(Host::Domain(d)) if is_localhost_name(d) => Err(refused_private()),
        None => Err(Refused("url must have a host".into())),
        _ => Ok(()),
    }
}

fn is_localhost_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// The check at creation: the literal host, then every address its name
/// resolves to, must be public. A name that does not resolve is refused too
/// (we could not check it).
pub(crate) async fn check_url(url: &Url, allow_private: bool) -> Result<(), Refused> {
    check_literal(url, allow_private)?;
    if allow_private {
        return Ok(());
    }
    let Some(Host::Domain(name)) = url.host() else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((name, port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(_)) | Err(_) => {
            return Err(Refused(format!("url host {name:?} does not resolve")));
        }
    };
    if addrs.is_empty() {
        return Err(Refused(format!("url host {name:?} does not resolve")));
    }
    if addrs.iter().any(|a| !is_public(a.ip())) {
        return Err(Refused(format!(
            "url host {name:?} resolves to a private, loopback, link-local, unspecified or multicast address"
        )));
    }
    Ok(())
}

/// The HTTP client's resolver: the system's answers minus non-public ones.
pub(crate) struct GuardResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            if !allow_private && is_localhost_name(&host) {
                return Err(Box::new(refused_private()) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(
                    Box::new(Refused(format!("{host} resolves to no public address")))
                        as Box<dyn std::error::Error + Send + Sync>,
                );
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The client every attempt uses: guarded DNS, no redirects (a 3xx is a
/// failed attempt), no proxy from the environment, the attempt timeout.
pub(crate) fn http_client(config: &WebhookConfig) -> crate::error::Result<reqwest::Client> {
    reqwest::Client::builder()
        .dns_resolver(GuardResolver {
            allow_private: config.allow_private,
        })
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("Tollgate-Webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .internal_ctx(|| "build the webhook HTTP client".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_addresses_are_not_public() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(ip(s)), "{s} should not be public");
        }
        for s in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(s)), "{s} should be public");
        }
    }

    #[test]
    fn literal_hosts_are_checked() {
        for u in [
            "http://127.0.0.1:8080/x",
            "http://10.0.0.1/",
            "http://[::1]:9/",
            "http://169.254.169.254/latest",
            "http://localhost:3000/",
            "http://api.localhost/",
            "http://0x7f000001/",
        ] {
            let url = parse_url(u).unwrap();
            assert!(check_literal(&url, false).is_err(), "{u}");
            assert!(check_literal(&url, true).is_ok(), "{u}");
        }
        assert!(check_literal(&parse_url("https://8.8.8.8/").unwrap(), false).is_ok());
    }

    #[test]
    fn only_http_urls_with_hosts() {
        assert!(parse_url("ftp://example.com/").is_err());
        assert!(parse_url("not a url").is_err());
        assert!(parse_url("file:///etc/passwd").is_err());
        assert!(parse_url("https://example.com/hook?x=1").is_ok());
    }
}
