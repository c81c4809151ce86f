//! Kernel forwarding for remote clients of a service endpoint: nftables DNAT.
//!
//! The connect-time balancer ([`crate::balancer`]) serves clients on this host only: it rewrites
//! their `connect(2)`. A client on another machine sends a SYN to the endpoint's address, which
//! the endpoint proxy would accept and relay at the cost of a second connection and two wake-ups
//! per message. Instead, a `prerouting` NAT rule rewrites the destination of that first packet to
//! one routed instance (`10.88.x.2:port`, picked at random per connection), as kube-proxy and
//! Docker without its userland proxy do; connection tracking then rewrites every later packet of
//! the flow both ways, so the instance answers the client directly through the host's routing,
//! with no user-space hop.
//!
//! Rules live in one nftables table per imago home (`ip imago_<hash>`), which nothing else
//! touches, and are always written whole in one transaction (`nft -f`: create, delete, define
//! again): a reader of the ruleset sees the old set or the new one, never half of each, and
//! writing the same set again (a restarted data plane replaying its routes) changes nothing.
//! They are kernel state, not held by a process: they keep forwarding while the data plane is
//! replaced, and [`Forwarder`]'s drop (or [`delete_table`], for a home whose data plane is gone)
//! removes them.
//!
//! Established flows keep the instance their first packet was sent to after the instance leaves
//! the rule (conntrack remembers the translation), which is what a drain needs;
//! [`forwarded_connections`] counts them from the conntrack table, so a retired instance is
//! stopped only once its forwarded flows have ended.
//!
//! Only private-network instances (their own address) can be forwarded to: a loopback backend
//! (host network) is unreachable from another interface, so a service with one is left to the
//! proxy, as is IPv6. Loopback endpoint addresses get no rule (no remote client reaches them);
//! packets from instances themselves (`iv-*`) are not forwarded either, so an instance that
//! calls its own service through the host is never sent back to itself (it gets the proxy).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Where the kernel says whether it forwards IPv4 at all.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// The conntrack table of this network namespace.
const CONNTRACK: &str = "/proc/net/nf_conntrack";

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot run nft: {0} (kernel forwarding needs nftables: apt-get install nftables)")]
    NoNft(#[source] io::Error),
    #[error("nft refused the rules of table ip {table}: {stderr}")]
    Nft { table: String, stderr: String },
    #[error(
        "this host does not forward IPv4 ({IP_FORWARD} is {value:?}): remote clients are served by the endpoint proxy"
    )]
    ForwardingOff { value: String },
}

/// What one service asks of the kernel: new connections to `listen` go to one of `backends`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forward {
    pub listen: Vec<SocketAddrV4>,
    pub backends: Vec<SocketAddrV4>,
}

impl Forward {
    /// Whether the kernel can forward this service: some address a remote client can reach,
    /// and backends that all have an address of their own.
    fn forwardable(&self) -> bool {
        !self.backends.is_empty()
            && self.backends.iter().all(|b| !b.ip().is_loopback())
            && self.listen.iter().any(|a| !a.ip().is_loopback())
    }
}

/// The forwarding rules of one imago home. Dropping it removes them.
#[derive(Debug)]
pub struct Forwarder {
    table: String,
    services: Mutex<BTreeMap<String, Forward>>,
}

impl Forwarder {
    /// Takes over the table `table` (its current rules stay until the first [`Forwarder::set`]
    /// writes the whole set). Fails if nft is missing or the host does not forward IPv4:
    /// a rule whose packets the kernel then drops would refuse clients the proxy would serve.
    pub fn new(table: &str) -> Result<Forwarder, ForwardError> {
        let value = std::fs::read_to_string(IP_FORWARD).unwrap_or_default();
        if value.trim() != "1" {
            return Err(ForwardError::ForwardingOff {
                value: value.trim().to_owned(),
            });
        }
        // Checks that nft runs (and that this process may use it) without changing anything.
        nft(table, &format!("table ip {table}\n"))?;
        Ok(Forwarder {
            table: table.to_owned(),
            services: Mutex::default(),
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Forwards `service` as `forward` says from now on (nothing, if the kernel cannot: see
    /// [`Forward`]). Returns whether the kernel forwards it.
    pub fn set(&self, service: &str, forward: Forward) -> Result<bool, ForwardError> {
        let mut services = self.lock();
        let forwarded = forward.forwardable();
        let changed = if forwarded {
            services.insert(service.to_owned(), forward.clone()) != Some(forward)
        } else {
            services.remove(service).is_some()
        };
        if changed {
            nft(&self.table, &ruleset(&self.table, &services))?;
        }
        Ok(forwarded)
    }

    /// Writes the whole set again (after a failed write, or to replace what a killed data plane
    /// left in the table).
    pub fn rewrite(&self) -> Result<(), ForwardError> {
        let services = self.lock();
        nft(&self.table, &ruleset(&self.table, &services))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Forward>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = delete_table(&self.table);
    }
}

/// Removes table `table` if it exists (a home whose data plane is gone: nothing serves its
/// endpoints, so nothing may be forwarded to its instances).
pub fn delete_table(table: &str) -> Result<(), ForwardError> {
    nft(
        table,
        &format!("table ip {table}\ndelete table ip {table}\n"),
    )
}

/// Whether table `table` exists.
pub fn table_exists(table: &str) -> Result<bool, ForwardError> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", table])
        .stdin(Stdio::null())
        .output()
        .map_err(ForwardError::NoNft)?;
    Ok(out.status.success())
}

/// The nft script that replaces table `table` by the rules of `services` in one transaction:
/// declared (so the deletion cannot fail), deleted, defined again; or only deleted when nothing
/// is forwarded.
pub fn ruleset(table: &str, services: &BTreeMap<String, Forward>) -> String {
    let mut rules = Vec::new();
    for (service, forward) in services.iter().filter(|(_, f)| f.forwardable()) {
        let map = forward
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : {} . {}", b.ip(), b.port()))
            .collect::<Vec<_>>()
            .join(", ");
        for listen in &forward.listen {
            let daddr = match *listen.ip() {
                ip if ip.is_loopback() => continue,
                Ipv4Addr::UNSPECIFIED => "fib daddr type local".to_owned(),
                ip => format!("ip daddr {ip}"),
            };
            rules.push(format!(
                "    {daddr} tcp dport {} dnat to numgen random mod {} map {{ {map} }} comment \"service {service}\"\n",
                listen.port(),
                forward.backends.len(),
            ));
        }
    }
    let mut script = format!("table ip {table}\ndelete table ip {table}\n");
    if !rules.is_empty() {
        script.push_str(&format!(
            "table ip {table} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    iifname {{ \"lo\", \"iv-*\" }} return\n{}  }}\n}}\n",
            rules.concat()
        ));
    }
    script
}

fn nft(table: &str, script: &str) -> Result<(), ForwardError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ForwardError::NoNft)?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().map_err(ForwardError::NoNft)?;
    if !out.status.success() || matches!(written, Some(Err(_))) {
        return Err(ForwardError::Nft {
            table: table.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Open flows the kernel forwarded (translated) to each of `backends`, from the conntrack table.
/// A flow counts until it is closed on both sides (TIME_WAIT and CLOSE do not count). Without a
/// conntrack table nothing was translated: all zeros.
pub fn forwarded_connections(backends: &[SocketAddrV4]) -> io::Result<Vec<usize>> {
    let text = match std::fs::read_to_string(CONNTRACK) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    Ok(count_forwarded(&text, backends))
}

/// [`forwarded_connections`] of a conntrack table's text.
pub fn count_forwarded(table: &str, backends: &[SocketAddrV4]) -> Vec<usize> {
    let mut counts = vec![0; backends.len()];
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // ipv4 2 tcp 6 TIMEOUT STATE src= dst= sport= dport= [flags] src= dst= sport= dport= ...
        if fields.get(2) != Some(&"tcp") {
            continue;
        }
        if !matches!(
            fields.get(5),
            Some(
                &("SYN_SENT" | "SYN_RECV" | "ESTABLISHED" | "FIN_WAIT" | "CLOSE_WAIT" | "LAST_ACK")
            )
        ) {
            continue;
        }
        let values = |key: &str| -> Vec<&str> {
            fields.iter().filter_map(|f| f.strip_prefix(key)).collect()
        };
        let (src, dst, sport, dport) = (
            values("src="),
            values("dst="),
            values("sport="),
            values("dport="),
        );
        if src.len() < 2 || dst.len() < 2 || sport.len() < 2 || dport.len() < 2 {
            continue;
        }
        // The reply comes from where the flow really goes; a flow whose original destination
        // is that same address was not translated (the proxy's own connections, direct ones).
        let (Ok(ip), Ok(port)) = (src[1].parse::<Ipv4Addr>(), sport[1].parse::<u16>()) else {
            continue;
        };
        if dst[0] == src[1] && dport[0] == sport[1] {
            continue;
        }
        let to = SocketAddrV4::new(ip, port);
        for (count, backend) in counts.iter_mut().zip(backends) {
            if *backend == to {
                *count += 1;
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn v4(text: &str) -> SocketAddrV4 {
        text.parse().unwrap()
    }

    #[test]
    fn the_ruleset_replaces_the_table_whole_and_skips_what_cannot_be_forwarded() {
        let mut services = BTreeMap::new();
        services.insert(
            "web".to_owned(),
            Forward {
                listen: vec![v4("0.0.0.0:80"), v4("127.0.0.1:81"), v4("192.0.2.7:82")],
                backends: vec![v4("10.88.0.6:8080"), v4("10.88.0.10:8080")],
            },
        );
        // Host network: its backend is on loopback, unreachable from another interface.
        services.insert(
            "host".to_owned(),
            Forward {
                listen: vec![v4("0.0.0.0:90")],
                backends: vec![v4("127.0.0.1:9000")],
            },
        );
        // Only on loopback: no remote client reaches it.
        services.insert(
            "local".to_owned(),
            Forward {
                listen: vec![v4("127.0.0.1:91")],
                backends: vec![v4("10.88.0.14:80")],
            },
        );
        let script = ruleset("imago_t", &services);
        assert!(
            script.starts_with("table ip imago_t\ndelete table ip imago_t\ntable ip imago_t {"),
            "{script}"
        );
        let rules: Vec<&str> = script.lines().filter(|l| l.contains("dnat")).collect();
        assert_eq!(
            rules,
            [
                "    fib daddr type local tcp dport 80 dnat to numgen random mod 2 map { 0 : 10.88.0.6 . 8080, 1 : 10.88.0.10 . 8080 } comment \"service web\"",
                "    ip daddr 192.0.2.7 tcp dport 82 dnat to numgen random mod 2 map { 0 : 10.88.0.6 . 8080, 1 : 10.88.0.10 . 8080 } comment \"service web\"",
            ]
        );
        assert!(script.contains("iifname { \"lo\", \"iv-*\" } return"));
        services.clear();
        assert_eq!(
            ruleset("imago_t", &services),
            "table ip imago_t\ndelete table ip imago_t\n",
            "nothing forwarded: no table"
        );
    }

    fn listed(table: &str) -> String {
        let out = Command::new("nft")
            .args(["list", "table", "ip", table])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_kernel_takes_the_rules_whole_and_they_end_with_the_forwarder() {
        // Root and nft (scripts/setup installs nftables); a table of this test alone.
        let table = format!("imago_test_{}", std::process::id());
        let forwarder = Forwarder::new(&table).expect("nft and net.ipv4.ip_forward = 1");
        let web = Forward {
            listen: vec![v4("0.0.0.0:18080")],
            backends: vec![v4("10.88.0.6:8080")],
        };
        assert!(forwarder.set("web", web.clone()).unwrap());
        assert!(
            listed(&table).contains("tcp dport 18080 dnat ip to"),
            "{}",
            listed(&table)
        );
        // A second service, then the first gone: each write is the whole set.
        let api = Forward {
            listen: vec![v4("0.0.0.0:18081")],
            backends: vec![v4("10.88.0.10:80"), v4("10.88.0.14:80")],
        };
        assert!(forwarder.set("api", api).unwrap());
        assert!(!forwarder.set("web", Forward::default()).unwrap());
        let rules = listed(&table);
        assert!(
            !rules.contains("18080") && rules.contains("18081"),
            "{rules}"
        );
        // Written again by a new forwarder (a restarted data plane): nothing doubles.
        forwarder.rewrite().unwrap();
        assert_eq!(listed(&table).matches("dnat").count(), 1);
        drop(forwarder);
        assert!(!table_exists(&table).unwrap(), "dropped with its forwarder");
        // Deleting what is not there is not an error (destroy without a data plane).
        delete_table(&table).unwrap();
    }

    #[test]
    fn forwarded_flows_are_counted_per_backend_until_closed() {
        let table = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.231.0.2 dst=10.231.0.1 sport=39782 dport=80 src=10.88.0.6 dst=10.231.0.2 sport=8080 dport=39782 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 119 SYN_SENT src=10.231.0.2 dst=10.231.0.1 sport=39783 dport=80 [UNREPLIED] src=10.88.0.6 dst=10.231.0.2 sport=8080 dport=39783 mark=0 zone=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=10.231.0.2 dst=10.231.0.1 sport=39784 dport=80 src=10.88.0.6 dst=10.231.0.2 sport=8080 dport=39784 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.88.0.5 dst=10.88.0.6 sport=50000 dport=8080 src=10.88.0.6 dst=10.88.0.5 sport=8080 dport=50000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 CLOSE_WAIT src=10.231.0.2 dst=10.231.0.1 sport=39785 dport=80 src=10.88.0.10 dst=10.231.0.2 sport=8080 dport=39785 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=10.231.0.2 dst=10.231.0.1 sport=5353 dport=80 src=10.88.0.6 dst=10.231.0.2 sport=8080 dport=5353 mark=0 zone=0 use=2
";
        assert_eq!(
            count_forwarded(
                table,
                &[
                    v4("10.88.0.6:8080"),
                    v4("10.88.0.10:8080"),
                    v4("10.88.0.14:8080")
                ]
            ),
            vec![2, 1, 0],
            "established and half-open count; closed, untranslated and udp flows do not"
        );
    }
}
