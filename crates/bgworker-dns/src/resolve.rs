//! Blocking name resolution with `getaddrinfo`, as LuaSocket reports it.

use std::ffi::{c_int, CStr};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ptr;

/// What a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The canonical name (for a numeric address: the address as given).
    pub name: String,
    /// Each address once: IPv4 first, then IPv6, each in the resolver's order.
    /// IPv4 first because LuaSocket's `toip` only ever returned IPv4, so its
    /// callers expect the first address to be one when the name has one.
    pub addresses: Vec<IpAddr>,
}

/// Frees a `getaddrinfo` result list when dropped.
struct AddrInfo(*mut libc::addrinfo);

impl Drop for AddrInfo {
    fn drop(&mut self) {
        // SAFETY: a list from a successful getaddrinfo, freed once.
        unsafe { libc::freeaddrinfo(self.0) }
    }
}

/// Resolve `host` (a name or a numeric IPv4/IPv6 address). Blocks, for as
/// long as the system resolver takes. Errors are LuaSocket's messages.
pub fn resolve(host: &CStr) -> Result<Resolved, String> {
    // SAFETY: all-zero is a valid `addrinfo` (null pointers, zero fields).
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    // One entry per address rather than one per socket type.
    hints.ai_socktype = libc::SOCK_STREAM;
    hints.ai_flags = libc::AI_CANONNAME;
    let mut list = ptr::null_mut();
    // SAFETY: valid C strings and hints; `list` receives the result.
    let code = unsafe { libc::getaddrinfo(host.as_ptr(), ptr::null(), &hints, &mut list) };
    if code != 0 {
        return Err(message(code));
    }
    let list = AddrInfo(list);

    let mut name = None;
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut entry = list.0;
    // SAFETY: walking the list getaddrinfo returned, alive until `list` drops;
    // each ai_addr has the layout its ai_family says.
    while let Some(ai) = unsafe { entry.as_ref() } {
        if name.is_none() && !ai.ai_canonname.is_null() {
            name = Some(unsafe { CStr::from_ptr(ai.ai_canonname) }.to_string_lossy().into_owned());
        }
        match ai.ai_family {
            libc::AF_INET => {
                let sin = unsafe { &*(ai.ai_addr as *const libc::sockaddr_in) };
                v4.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ai.ai_addr as *const libc::sockaddr_in6) };
                v6.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
        entry = ai.ai_next;
    }
    let mut addresses = Vec::with_capacity(v4.len() + v6.len());
    for address in v4.into_iter().chain(v6) {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    if addresses.is_empty() {
        // Only families other than IPv4 and IPv6: nothing to report.
        return Err(message(libc::EAI_NODATA));
    }
    let name = name.unwrap_or_else(|| host.to_string_lossy().into_owned());
    Ok(Resolved { name, addresses })
}

/// LuaSocket's wording: `toip`'s "host not found" for a name that does not
/// resolve, and its getaddrinfo messages for the rest.
fn message(code: c_int) -> String {
    match code {
        libc::EAI_NONAME | libc::EAI_NODATA => "host not found".into(),
        libc::EAI_AGAIN => "temporary failure in name resolution".into(),
        libc::EAI_FAIL => "non-recoverable failure in name resolution".into(),
        libc::EAI_MEMORY => "memory allocation failure".into(),
        libc::EAI_SYSTEM => std::io::Error::last_os_error().to_string(),
        // SAFETY: gai_strerror returns a static string for any code.
        _ => unsafe { CStr::from_ptr(libc::gai_strerror(code)) }.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_has_the_ipv4_loopback_first() {
        let resolved = resolve(c"localhost").unwrap();
        assert_eq!(resolved.name, "localhost");
        assert_eq!(resolved.addresses.first(), Some(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn numeric_addresses_resolve_to_themselves() {
        assert_eq!(resolve(c"127.0.0.1").unwrap().addresses, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let v6 = resolve(c"::1").unwrap();
        assert_eq!(v6.addresses, [IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        assert_eq!(v6.name, "::1");
    }

    #[test]
    fn an_invalid_name_is_not_found() {
        // Malformed (an empty label): refused before any DNS query is sent.
        assert_eq!(resolve(c"nonexistent..invalid"), Err("host not found".to_string()));
    }
}
